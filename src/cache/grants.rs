//! [`Grants`]: who may be served what from the cache. Pure and in memory; the caller decides
//! what a principal is, when the upstream proved a grant, and what `now` is.
//!
//! Two tables, both bounded:
//! - grants: (principal, upstream, repository) → valid until an `Instant`. At the cap the grant
//!   that expires soonest goes first (so expired ones go before any live one); expired grants are
//!   also dropped when met ([`Grants::is_granted`]) and by [`Grants::sweep`].
//! - sightings: (upstream, repository, digest) the upstream served ([`Grants::seen`]), in two
//!   generations: new sightings go to the young one; when it holds half the cap, it becomes the
//!   old one and the previous old one is forgotten. A pair seen again while old moves back to
//!   the young generation, so the pairs in use stay and the least recently seen go, half the
//!   cap at a time. Forgetting a pair only costs a trip to the upstream.
//!
//! Memory, measured (RSS, allocator slack included; `sightings_memory` in the tests): ~125 bytes
//! a sighting, ~30 MB at [`DEFAULT_MAX_SEEN`]; ~220 bytes a grant when every grant names
//! another repository, ~11 MB at [`DEFAULT_MAX_GRANTS`]. The defaults fit next to the 256 MiB
//! memory limit of the deploy manifests (a million sightings would take ~125 MB).
//!
//! Upstream and repository names are interned (one copy per repository, however many digests
//! and principals refer to it), and freed when nothing refers to them any more.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::Digest;

/// Default bound on grants held.
pub const DEFAULT_MAX_GRANTS: usize = 50_000;
/// Default bound on (upstream, repository, digest) sightings held.
pub const DEFAULT_MAX_SEEN: usize = 250_000;

/// The authorization table of the cache (see the module docs of [`crate::cache`]).
pub struct Grants {
    // A std mutex: every operation is a few map updates, never an await.
    table: Mutex<Table>,
    max_grants: usize,
    max_seen: usize,
}

#[derive(Default)]
struct Table {
    repos: Repos,
    /// principal → repository id → grant.
    principals: HashMap<Arc<str>, HashMap<u32, Grant>>,
    /// (until, seq) → who; the first expires soonest.
    by_expiry: BTreeMap<(Instant, u64), (Arc<str>, u32)>,
    grants: usize,
    /// Sightings since the last rotation.
    young: HashSet<Pair>,
    /// Sightings of the generation before, forgotten at the next rotation.
    old: HashSet<Pair>,
    seq: u64,
}

#[derive(Clone, Copy)]
struct Grant {
    until: Instant,
    seq: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Pair {
    digest: [u8; 32],
    repo: u32,
}

/// (upstream, repository) ↔ small id, counted by the grants and sightings that use it. Each
/// name is stored once, shared by the map and the slot.
#[derive(Default)]
struct Repos {
    ids: HashMap<Arc<RepoName>, u32>,
    slots: Vec<Option<RepoSlot>>,
    free: Vec<u32>,
}

/// (upstream, repository).
type RepoName = (String, String);

struct RepoSlot {
    name: Arc<RepoName>,
    users: usize,
}

impl RepoSlot {
    fn upstream(&self) -> &str {
        &self.name.0
    }

    fn repo(&self) -> &str {
        &self.name.1
    }
}

impl Repos {
    fn find(&self, upstream: &str, repo: &str) -> Option<u32> {
        // One allocation per query: simpler than a borrowed-key map, and cheap next to a request.
        let name: RepoName = (upstream.to_owned(), repo.to_owned());
        self.ids.get(&name).copied()
    }

    fn slot(&mut self, id: u32) -> &mut Option<RepoSlot> {
        &mut self.slots[id as usize]
    }

    fn get(&self, id: u32) -> &RepoSlot {
        let slot = self.slots[id as usize].as_ref();
        slot.expect("a used repository id")
    }

    fn acquire(&mut self, upstream: &str, repo: &str) -> u32 {
        if let Some(id) = self.find(upstream, repo) {
            self.slot(id).as_mut().expect("a used repository id").users += 1;
            return id;
        }
        let name = Arc::new((upstream.to_owned(), repo.to_owned()));
        let slot = RepoSlot {
            name: name.clone(),
            users: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                *self.slot(id) = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 repositories")
            }
        };
        self.ids.insert(name, id);
        id
    }

    fn release(&mut self, id: u32) {
        let cell = self.slot(id);
        let slot = cell.as_mut().expect("a used repository id");
        slot.users -= 1;
        if slot.users == 0 {
            let slot = cell.take().expect("a used repository id");
            self.ids.remove(&*slot.name);
            self.free.push(id);
        }
    }
}

impl Table {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn grant_of(&self, principal: &str, repo: u32) -> Option<Grant> {
        self.principals.get(principal)?.get(&repo).copied()
    }

    /// Whether `principal` holds a grant for `repo` at `now`; drops it if it has expired.
    fn granted(&mut self, principal: &str, repo: u32, now: Instant) -> bool {
        match self.grant_of(principal, repo) {
            Some(g) if now < g.until => true,
            Some(_) => {
                self.drop_grant(principal, repo);
                false
            }
            None => false,
        }
    }

    fn drop_grant(&mut self, principal: &str, repo: u32) {
        let Some(grants) = self.principals.get_mut(principal) else {
            return;
        };
        let Some(g) = grants.remove(&repo) else {
            return;
        };
        if grants.is_empty() {
            self.principals.remove(principal);
        }
        self.by_expiry.remove(&(g.until, g.seq));
        self.repos.release(repo);
        self.grants -= 1;
    }

    /// Drops the grant that expires first; `false` when there is none.
    fn drop_soonest(&mut self) -> bool {
        let first = self.by_expiry.first_key_value();
        let Some((principal, repo)) = first.map(|(_, (p, r))| (p.clone(), *r)) else {
            return false;
        };
        self.drop_grant(&principal, repo);
        true
    }

    fn principal_key(&mut self, principal: &str) -> Arc<str> {
        match self.principals.get_key_value(principal) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(principal);
                self.principals.insert(k.clone(), HashMap::new());
                k
            }
        }
    }

    fn is_seen(&self, pair: &Pair) -> bool {
        self.young.contains(pair) || self.old.contains(pair)
    }

    /// Makes room for one more young sighting: a full young generation becomes the old one,
    /// and the old one is forgotten.
    fn make_room(&mut self, half: usize) {
        if self.young.len() < half {
            return;
        }
        let young = std::mem::take(&mut self.young);
        for pair in std::mem::replace(&mut self.old, young) {
            self.repos.release(pair.repo);
        }
    }
}

impl Default for Grants {
    fn default() -> Grants {
        Grants::new(DEFAULT_MAX_GRANTS, DEFAULT_MAX_SEEN)
    }
}

impl Grants {
    /// An empty table holding at most `max_grants` grants and `max_seen` sightings.
    pub fn new(max_grants: usize, max_seen: usize) -> Grants {
        Grants {
            table: Mutex::new(Table::default()),
            max_grants: max_grants.max(1),
            max_seen: max_seen.max(1),
        }
    }

    /// The table; a panic elsewhere while it was held leaves it whole (each change is one
    /// step), so it is used as it is rather than making every later pull panic.
    fn lock(&self) -> MutexGuard<'_, Table> {
        crate::lock::lock(&self.table)
    }

    /// Records that `principal` may pull `repo` of `upstream` until `until` (exclusive). Give
    /// no later `until` than the expiry of the token that proved it. A new grant for the same
    /// triple replaces the old one (the latest proof wins, even if shorter).
    pub fn grant(&self, principal: &str, upstream: &str, repo: &str, until: Instant) {
        let mut guard = self.lock();
        let t = &mut *guard;
        let seq = t.next_seq();
        if let Some(id) = t.repos.find(upstream, repo) {
            if let Some(g) = t.principals.get_mut(principal).and_then(|m| m.get_mut(&id)) {
                let who = t
                    .by_expiry
                    .remove(&(g.until, g.seq))
                    .expect("an indexed grant");
                *g = Grant { until, seq };
                t.by_expiry.insert((until, seq), who);
                return;
            }
        }
        while t.grants >= self.max_grants && t.drop_soonest() {}
        let id = t.repos.acquire(upstream, repo);
        let key = t.principal_key(principal);
        let grants = t.principals.get_mut(&key).expect("just inserted");
        grants.insert(id, Grant { until, seq });
        t.by_expiry.insert((until, seq), (key, id));
        t.grants += 1;
    }

    /// Whether `principal` holds a grant for `repo` of `upstream` at `now` (an expired grant is
    /// dropped here).
    pub fn is_granted(&self, principal: &str, upstream: &str, repo: &str, now: Instant) -> bool {
        let mut t = self.lock();
        match t.repos.find(upstream, repo) {
            Some(id) => t.granted(principal, id, now),
            None => false,
        }
    }

    /// Withdraws a grant (the upstream refused this principal for this repository).
    pub fn revoke(&self, principal: &str, upstream: &str, repo: &str) {
        let mut t = self.lock();
        if let Some(id) = t.repos.find(upstream, repo) {
            t.drop_grant(principal, id);
        }
    }

    /// Drops every grant expired at `now`; returns how many. Optional: expired grants never
    /// authorize anything, this only frees their memory early.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut t = self.lock();
        let mut dropped = 0;
        while let Some((&(until, _), (principal, repo))) = t.by_expiry.first_key_value() {
            if until > now {
                break;
            }
            let (principal, repo) = (principal.clone(), *repo);
            t.drop_grant(&principal, repo);
            dropped += 1;
        }
        dropped
    }

    /// Records that `upstream` served `digest` for `repo` (a blob or manifest fetched, or
    /// confirmed with a `HEAD`, under that repository).
    pub fn seen(&self, upstream: &str, repo: &str, digest: &Digest) {
        let mut guard = self.lock();
        let t = &mut *guard;
        let half = (self.max_seen / 2).max(1);
        let digest = *digest.as_bytes();
        if let Some(repo) = t.repos.find(upstream, repo) {
            let pair = Pair { digest, repo };
            if t.young.contains(&pair) {
                return;
            }
            if t.old.remove(&pair) {
                t.make_room(half);
                t.young.insert(pair);
                return;
            }
        }
        t.make_room(half);
        let pair = Pair {
            digest,
            repo: t.repos.acquire(upstream, repo),
        };
        t.young.insert(pair);
    }

    /// The strict check the proxy path uses: `digest` may be served from the cache to
    /// `principal` under `repo` of `upstream` only if the upstream served `digest` for `repo`
    /// and `principal` holds a grant for `repo` at `now`.
    pub fn may_serve_in(
        &self,
        principal: &str,
        upstream: &str,
        repo: &str,
        digest: &Digest,
        now: Instant,
    ) -> bool {
        let mut t = self.lock();
        let Some(id) = t.repos.find(upstream, repo) else {
            return false;
        };
        let pair = Pair {
            digest: *digest.as_bytes(),
            repo: id,
        };
        t.is_seen(&pair) && t.granted(principal, id, now)
    }

    /// A repository of `upstream` in which `digest` was seen and for which `principal` holds a
    /// grant at `now`, if any: the looser check, for a request that names no repository. The
    /// proxy path asks [`Grants::may_serve_in`].
    pub fn may_serve(
        &self,
        principal: &str,
        upstream: &str,
        digest: &Digest,
        now: Instant,
    ) -> Option<String> {
        let t = self.lock();
        let grants = t.principals.get(principal)?;
        let digest = *digest.as_bytes();
        grants
            .iter()
            .filter(|(_, g)| now < g.until)
            .map(|(&repo, _)| (repo, t.repos.get(repo)))
            .filter(|(_, slot)| slot.upstream() == upstream)
            .find(|&(repo, _)| t.is_seen(&Pair { digest, repo }))
            .map(|(_, slot)| slot.repo().to_owned())
    }

    /// Grants held now (expired ones not yet dropped included).
    pub fn grants_len(&self) -> usize {
        self.lock().grants
    }

    /// Sightings held now.
    pub fn seen_len(&self) -> usize {
        let t = self.lock();
        t.young.len() + t.old.len()
    }
}

#[cfg(test)]
mod tests;
