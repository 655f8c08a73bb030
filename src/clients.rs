//! Fair shares: what one client may hold of each pool all clients share.
//!
//! Connections (`--max-connections`), requests in flight (`--max-requests`, HTTP/2 streams
//! included) and upstream connections (`--max-upstream-connections`) are global pools. Without a
//! per-client bound one client can take a whole pool: a single unauthenticated HTTP/2 client that
//! sets its flow-control window to zero and opens streams held every request slot, health checks
//! included. So each client holds at most `--client-share-percent` of each pool:
//!
//! - a client is an address, an IPv6 client its /64 (one host, or one customer, owns a /64);
//!   behind `--trusted-proxies` it is the address the front forwards ([`client_address`]);
//! - past its share of requests a client gets 503 at once (the others are not touched); past its
//!   share of upstream connections its request waits a moment for one of its own, then 503;
//! - past its share of connections a new connection from it is closed at once; a trusted front's
//!   own connections are not counted per client (every client behind it shares them).
//!
//! Stalled streams and connections are shed under pressure by [`crate::server`]; this module only
//! counts. An entry lives while something of its client is held, and is swept afterwards, so the
//! table is bounded by what is in flight.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{canonical_ip, Cidr, Limits};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// How often a wait for a slot of an exhausted pool asks the holders that make no progress to
/// leave again.
const PRESSURE_REPEAT: Duration = Duration::from_millis(100);

/// A permit of `pool`: at once, or, when all are taken, within `wait`, signalling `pressure`
/// (holders that make no progress are shed, [`crate::server`]) now and every 100 ms meanwhile.
pub async fn acquire_pressing(
    pool: &Arc<Semaphore>,
    pressure: Option<&tokio::sync::Notify>,
    wait: Duration,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = pool.clone().try_acquire_owned() {
        return Some(permit);
    }
    let repeat = async {
        loop {
            if let Some(p) = pressure {
                p.notify_waiters();
            }
            let slot = pool.clone().acquire_owned();
            if let Ok(Ok(permit)) = tokio::time::timeout(PRESSURE_REPEAT, slot).await {
                return permit;
            }
        }
    };
    tokio::time::timeout(wait, repeat).await.ok()
}

/// A client, as shares count it: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> ClientKey {
        match canonical_ip(ip) {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                ClientKey(IpAddr::V6(prefix.into()))
            }
            v4 => ClientKey(v4),
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => v4.fmt(f),
        }
    }
}

/// Who sent a request, as far as regrelay can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddress {
    /// The socket peer (not a trusted front), or a trusted front that forwarded no address.
    Peer(IpAddr),
    /// The address a trusted front forwarded (the rightmost one that is not itself a trusted
    /// front).
    Forwarded(IpAddr),
    /// A trusted front forwarded something that is not an address: the client is unknown (it
    /// counts as the front for shares, and gets nothing that depends on who it is).
    Unknown(IpAddr),
}

impl ClientAddress {
    /// The address shares are counted by.
    pub fn ip(&self) -> IpAddr {
        match *self {
            ClientAddress::Peer(ip) | ClientAddress::Forwarded(ip) | ClientAddress::Unknown(ip) => {
                ip
            }
        }
    }

    /// The address when it is known (not [`ClientAddress::Unknown`]).
    pub fn known(&self) -> Option<IpAddr> {
        match *self {
            ClientAddress::Peer(ip) | ClientAddress::Forwarded(ip) => Some(ip),
            ClientAddress::Unknown(_) => None,
        }
    }
}

/// The client of a request from `peer`: the peer itself, unless it is a trusted front; then the
/// rightmost `X-Forwarded-For` entry that is not a trusted front (entries to its left are what
/// the client claimed, and anyone can claim anything). A trusted front that sent no
/// `X-Forwarded-For` is the client itself.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> ClientAddress {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return ClientAddress::Peer(peer);
    }
    let mut last_trusted = None;
    let entries = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .flat_map(|v| {
            let v = v.to_str().unwrap_or("\u{0}");
            v.rsplit(',').map(str::trim).collect::<Vec<_>>()
        });
    for entry in entries {
        let Some(ip) = forwarded_ip(entry) else {
            return ClientAddress::Unknown(peer);
        };
        if !is_trusted(ip) {
            return ClientAddress::Forwarded(ip);
        }
        last_trusted = Some(ip);
    }
    // Every hop is a trusted front: the first of them is where the request came from.
    match last_trusted {
        Some(ip) => ClientAddress::Forwarded(ip),
        None => ClientAddress::Peer(peer),
    }
}

/// An `X-Forwarded-For` entry's address: `192.0.2.7`, `2001:db8::1`, `[2001:db8::1]`, with an
/// optional port on the bracketed or IPv4 form.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = entry.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .and_then(|e| e.parse().ok())
}

/// One client's holdings.
#[derive(Debug)]
pub struct Client {
    key: ClientKey,
    connections: AtomicUsize,
    requests: Arc<Semaphore>,
    upstream: Arc<Semaphore>,
}

impl Client {
    /// Its key.
    pub fn key(&self) -> ClientKey {
        self.key
    }

    /// Takes one of its request slots, unless it holds its whole share.
    pub fn try_request(self: &Arc<Self>) -> Option<Share> {
        let permit = self.requests.clone().try_acquire_owned().ok()?;
        Some(Share {
            _permit: permit,
            _client: self.clone(),
        })
    }

    /// Takes one of its upstream connection slots, waiting up to `wait` for one.
    pub async fn upstream_slot(self: &Arc<Self>, wait: Duration) -> Option<Share> {
        let sem = self.upstream.clone();
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::time::timeout(wait, sem.acquire_owned())
                .await
                .ok()?
                .ok()?,
        };
        Some(Share {
            _permit: permit,
            _client: self.clone(),
        })
    }
}

/// A slot held in a client's share; released on drop.
#[derive(Debug)]
pub struct Share {
    _permit: OwnedSemaphorePermit,
    _client: Arc<Client>,
}

/// A connection counted in a client's share; released on drop.
#[derive(Debug)]
pub struct ConnectionShare {
    client: Arc<Client>,
}

impl Drop for ConnectionShare {
    fn drop(&mut self) {
        self.client.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client a request is counted for, in the request's extensions (so the upstream client can
/// count its upstream connection in the same share).
#[derive(Debug, Clone)]
pub struct ClientHandle {
    /// Its holdings.
    pub client: Arc<Client>,
    /// Who it is.
    pub address: ClientAddress,
}

/// Each pool's per-client share.
#[derive(Debug, Clone, Copy)]
pub struct Shares {
    /// Connections.
    pub connections: usize,
    /// Requests in flight.
    pub requests: usize,
    /// Upstream connections, all upstreams together.
    pub upstream: usize,
}

impl Shares {
    /// The shares of `limits`' pools.
    pub fn of(limits: &Limits) -> Shares {
        Shares {
            connections: limits.client_share(limits.max_connections),
            requests: limits.client_share(limits.max_requests),
            upstream: limits.client_share(limits.max_upstream_connections),
        }
    }
}

/// Every client holding something.
#[derive(Debug)]
pub struct Clients {
    map: DashMap<ClientKey, Arc<Client>>,
    shares: Shares,
    /// Sweep when the table grows past this.
    sweep_at: AtomicUsize,
}

/// Smallest table size at which unused entries are swept.
const SWEEP_FLOOR: usize = 1024;

impl Clients {
    /// An empty table for `shares`.
    pub fn new(shares: Shares) -> Clients {
        Clients {
            map: DashMap::new(),
            shares,
            sweep_at: AtomicUsize::new(SWEEP_FLOOR),
        }
    }

    /// The shares.
    pub fn shares(&self) -> Shares {
        self.shares
    }

    /// Clients in the table now (those holding something, and some that just stopped).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry of `ip`'s client.
    pub fn get(&self, ip: IpAddr) -> Arc<Client> {
        let key = ClientKey::of(ip);
        if let Some(c) = self.map.get(&key) {
            return c.clone();
        }
        if self.map.len() >= self.sweep_at.load(Ordering::Relaxed) {
            self.sweep();
        }
        self.map
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Client {
                    key,
                    connections: AtomicUsize::new(0),
                    requests: Arc::new(Semaphore::new(self.shares.requests)),
                    upstream: Arc::new(Semaphore::new(self.shares.upstream)),
                })
            })
            .clone()
    }

    /// Counts one more connection of `ip`'s client, unless it holds its share of connections.
    pub fn connection(&self, ip: IpAddr) -> Option<ConnectionShare> {
        let client = self.get(ip);
        let held = client.connections.fetch_add(1, Ordering::AcqRel);
        let share = ConnectionShare { client };
        (held < self.shares.connections).then_some(share)
    }

    /// Drops entries nothing holds (only the table refers to them).
    fn sweep(&self) {
        self.map.retain(|_, c| Arc::strong_count(c) > 1);
        let next = (2 * self.map.len()).max(SWEEP_FLOOR);
        self.sweep_at.store(next, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_is_an_address_or_an_ipv6_slash_64() {
        assert_eq!(
            ClientKey::of(ip("192.0.2.7")),
            ClientKey::of(ip("192.0.2.7"))
        );
        assert_ne!(
            ClientKey::of(ip("192.0.2.7")),
            ClientKey::of(ip("192.0.2.8"))
        );
        assert_eq!(
            ClientKey::of(ip("2001:db8:1:2:aaaa::1")),
            ClientKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::of(ip("::ffff:192.0.2.7")),
            ClientKey::of(ip("192.0.2.7"))
        );
        assert_eq!(
            ClientKey::of(ip("2001:db8:1:2:aaaa::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn the_client_behind_a_trusted_front_is_the_rightmost_untrusted_hop() {
        let trusted = [
            Cidr::parse("trusted_proxies", "127.0.0.1").unwrap(),
            Cidr::parse("trusted_proxies", "10.0.0.0/8").unwrap(),
        ];
        let with = |xff: &[&str]| {
            let mut h = HeaderMap::new();
            for v in xff {
                h.append(&X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let front = ip("127.0.0.1");
        use ClientAddress::*;
        let cases: &[(&str, &[&str], ClientAddress)] = &[
            // Not a front: its claims count for nothing.
            ("203.0.113.9", &["127.0.0.1"], Peer(ip("203.0.113.9"))),
            // A front without forwarding headers is the client.
            ("127.0.0.1", &[], Peer(front)),
            ("127.0.0.1", &["203.0.113.9"], Forwarded(ip("203.0.113.9"))),
            // The client's own claim (left) is skipped: the front appended the real one.
            (
                "127.0.0.1",
                &["127.0.0.5, 203.0.113.9"],
                Forwarded(ip("203.0.113.9")),
            ),
            // Through two fronts.
            (
                "127.0.0.1",
                &["198.51.100.1, 10.1.2.3"],
                Forwarded(ip("198.51.100.1")),
            ),
            (
                "127.0.0.1",
                &["198.51.100.1", "10.1.2.3"],
                Forwarded(ip("198.51.100.1")),
            ),
            // Only fronts: the first of them.
            (
                "127.0.0.1",
                &["10.9.9.9, 127.0.0.1"],
                Forwarded(ip("10.9.9.9")),
            ),
            (
                "127.0.0.1",
                &["[2001:db8::1]:4711"],
                Forwarded(ip("2001:db8::1")),
            ),
            ("127.0.0.1", &["192.0.2.1:80"], Forwarded(ip("192.0.2.1"))),
            // Garbage where an address should be: unknown, never the front's own address.
            ("127.0.0.1", &["unknown"], Unknown(front)),
            ("127.0.0.1", &["203.0.113.9, garbage"], Unknown(front)),
        ];
        for (peer, xff, want) in cases {
            let got = client_address(&with(xff), ip(peer), &trusted);
            assert_eq!(got, *want, "{peer} {xff:?}");
        }
    }

    #[test]
    fn shares_bound_each_client_and_entries_go_when_released() {
        let clients = Clients::new(Shares {
            connections: 2,
            requests: 2,
            upstream: 1,
        });
        let a = clients.get(ip("192.0.2.1"));
        let (r1, r2) = (a.try_request().unwrap(), a.try_request().unwrap());
        assert!(
            a.try_request().is_none(),
            "a third request is over the share"
        );
        // Another client is not touched.
        let b = clients.get(ip("192.0.2.2"));
        assert!(b.try_request().is_some());
        drop(r1);
        assert!(a.try_request().is_some());
        drop(r2);
        let c1 = clients.connection(ip("192.0.2.1")).unwrap();
        let c2 = clients.connection(ip("192.0.2.1")).unwrap();
        assert!(clients.connection(ip("192.0.2.1")).is_none());
        drop(c1);
        assert!(clients.connection(ip("192.0.2.1")).is_some());
        drop((a, b));
        clients.sweep();
        assert_eq!(clients.len(), 1, "the client with a connection stays");
        drop(c2);
        clients.sweep();
        assert!(clients.is_empty(), "nothing held: swept");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_slot_waits_for_the_clients_own_release() {
        let clients = Clients::new(Shares {
            connections: 1,
            requests: 1,
            upstream: 1,
        });
        let a = clients.get(ip("192.0.2.1"));
        let held = a.upstream_slot(Duration::from_secs(2)).await.unwrap();
        assert!(a.upstream_slot(Duration::from_secs(2)).await.is_none());
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.upstream_slot(Duration::from_secs(2)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(held);
        assert!(waiter.await.unwrap());
    }
}
