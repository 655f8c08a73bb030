//! Keeping secrets out of doctor's output without touching doctor's own words.
//!
//! Doctor never formats a secret: the password or token it found is only sent (Basic, or
//! `PRIVATE-TOKEN`) and compared, and a token a token service issues is only read for its
//! claims. What doctor prints is its own prose and values it chose to show (usernames, hosts,
//! projects, tags), plus text that came from elsewhere: what a server answered, an error's
//! chain. That text is marked where it enters a message ([`quote`]), and only there are the
//! secrets doctor holds searched for as such. Doctor's own words are never searched for a
//! password: a password that is an ordinary word (`wrong`, `a`, `pass`) stays an ordinary word
//! there, and a `[redacted]` in doctor's prose would point at the password.
//!
//! The rules ([`Redactor::render`]), every match a whole token (no letter or digit on either
//! side of it, so `pass` is never cut out of `password`):
//! - in quoted text: every secret; one that could be an ordinary word (see
//!   [`Needle::distinctive`]) only where it stands as a value (`user:secret`, `password=secret`,
//!   `"password":"secret"`: how servers echo a credential), so that a server's own sentence is
//!   not made to point at it; and anything shaped like a JWT.
//! - everywhere (the safety net): anything shaped like a JWT, the tokens token services issued,
//!   the Basic encodings doctor sent, and credentials distinctive enough that they cannot be
//!   doctor's words: a GitLab token prefix, or 12 or more characters mixing letters and digits.
//!
//! Rendering removes the marks.

/// Opens a quoted (foreign) region: a private-use character no server text keeps (removed
/// from what is quoted).
const OPEN: char = '\u{E000}';
/// Closes a quoted region.
const CLOSE: char = '\u{E001}';
/// What a secret becomes.
const REDACTED: &str = "[redacted]";

/// The prefixes of GitLab's tokens (personal/project/group access, deploy, CI job, runner,
/// feed, OAuth, SCIM, agent, incoming mail, pipeline trigger, feature flags client).
const GITLAB_TOKEN_PREFIXES: &[&str] = &[
    "glpat-", "gldt-", "glcbt-", "glrt-", "glft-", "gloas-", "glsoat-", "glagent-", "glimt-",
    "glptt-", "glffct-",
];

/// Marks `foreign` (what a server said, an error's text) as not doctor's words: only quoted text
/// is searched for every secret doctor holds.
pub(super) fn quote(foreign: &str) -> String {
    let clean: String = foreign
        .chars()
        .filter(|c| !matches!(*c, OPEN | CLOSE))
        .collect();
    if clean.is_empty() {
        return clean;
    }
    format!("{OPEN}{clean}{CLOSE}")
}

/// One secret.
#[derive(Clone)]
struct Needle {
    text: String,
    /// Cannot be mistaken for a word of doctor's or of a server's sentence: searched for
    /// everywhere, and anywhere in quoted text (not only as a value).
    distinctive: bool,
}

impl Needle {
    /// A credential found in the environment or a Docker config.
    fn credential(text: &str) -> Needle {
        let letters = text.chars().any(|c| c.is_ascii_alphabetic());
        let digits = text.chars().any(|c| c.is_ascii_digit());
        let distinctive = GITLAB_TOKEN_PREFIXES.iter().any(|p| text.starts_with(p))
            || (text.chars().count() >= 12 && letters && digits);
        Needle {
            text: text.to_owned(),
            distinctive,
        }
    }

    /// What doctor made or was given by a server: a Basic encoding, an issued token.
    fn made(text: &str) -> Needle {
        Needle {
            text: text.to_owned(),
            distinctive: true,
        }
    }
}

/// The secrets of one run.
#[derive(Default)]
pub(super) struct Redactor {
    needles: Vec<Needle>,
}

impl Redactor {
    /// A credential doctor may send: `user`'s `secret`, and its Basic encoding.
    pub(super) fn add_credential(&mut self, user: &str, secret: &str) {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
        self.push(Needle::credential(secret));
        self.push(Needle::made(&basic));
    }

    /// A token a token service issued (and its signature part alone, in case something cut
    /// the rest off).
    pub(super) fn add_issued(&mut self, token: &str) {
        self.push(Needle::made(token));
        if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 20) {
            self.push(Needle::made(sig));
        }
    }

    fn push(&mut self, needle: Needle) {
        if needle.text.is_empty() {
            return;
        }
        match self.needles.iter_mut().find(|n| n.text == needle.text) {
            Some(n) => n.distinctive |= needle.distinctive,
            None => {
                self.needles.push(needle);
                // Longer first: a Basic encoding before a secret it may contain.
                self.needles
                    .sort_by_key(|n| std::cmp::Reverse(n.text.len()));
            }
        }
    }

    /// `text` as printed: quoted regions searched for every secret, the rest only for what
    /// cannot be doctor's words (see the module docs); marks removed.
    pub(super) fn render(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find(OPEN) {
            out.push_str(&self.own(&rest[..i]));
            let after = &rest[i + OPEN.len_utf8()..];
            let (inner, tail) = after.split_once(CLOSE).unwrap_or((after, ""));
            out.push_str(&self.foreign(inner));
            rest = tail;
        }
        out.push_str(&self.own(rest));
        out
    }

    /// Doctor's words: only what cannot be a word of them.
    fn own(&self, text: &str) -> String {
        let mut out: String = text.chars().filter(|c| *c != CLOSE).collect();
        for n in self.needles.iter().filter(|n| n.distinctive) {
            out = replace_tokens(&out, &n.text, false);
        }
        redact_jwts(&out)
    }

    /// A server's words: every secret.
    fn foreign(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for n in &self.needles {
            out = replace_tokens(&out, &n.text, !n.distinctive);
        }
        redact_jwts(&out)
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// `text` with each whole-token occurrence of `needle` replaced by [`REDACTED`]; with
/// `as_value`, only occurrences that stand as a value.
fn replace_tokens(text: &str, needle: &str, as_value: bool) -> String {
    let (Some(first), Some(last)) = (needle.chars().next(), needle.chars().next_back()) else {
        return text.to_owned();
    };
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut from) = (0, 0);
    while let Some(i) = text[from..].find(needle) {
        let (start, end) = (from + i, from + i + needle.len());
        let before = text[..start].chars().next_back();
        let after = text[end..].chars().next();
        // Part of a longer word on either side: another word, not the secret.
        let joined = (is_word(first) && before.is_some_and(is_word))
            || (is_word(last) && after.is_some_and(is_word));
        let whole = !joined;
        if whole && (!as_value || stands_as_value(&text[..start])) {
            out.push_str(&text[copied..start]);
            out.push_str(REDACTED);
            copied = end;
            from = end;
        } else {
            from = start + first.len_utf8();
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// True when what follows `before` is a value: right after `:` or `=`, or a quote opened there.
fn stands_as_value(before: &str) -> bool {
    let before = before.strip_suffix(['"', '\'']).unwrap_or(before);
    before.ends_with([':', '='])
}

/// Replaces every `eyJ…​.…` that starts a token (a JWT: base64url JSON header) with
/// [`REDACTED`].
fn redact_jwts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("eyJ") {
        let starts_token = !rest[..i].chars().next_back().is_some_and(is_word);
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=')))
            .unwrap_or(tail.len());
        if starts_token && tail[..end].contains('.') {
            out.push_str(REDACTED);
        } else {
            out.push_str(&tail[..end]);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQtdGhhdC1pcy1sb25n";

    fn with(user: &str, secret: &str) -> Redactor {
        let mut r = Redactor::default();
        r.add_credential(user, secret);
        r
    }

    #[test]
    fn doctors_own_words_keep_a_password_that_is_a_word() {
        for secret in ["wrong", "a", "pass", "password", "the", "5000"] {
            let r = with("dana", secret);
            let own = "GitLab answers the same for a wrong token, a password or pass; \
                       --password-stdin; 127.0.0.1:5000";
            assert_eq!(r.render(own), own, "{secret:?}");
            // In a server's sentence too, where it does not stand as a value.
            let said = quote("If a password was provided, the password was wrong");
            assert_eq!(
                r.render(&said),
                "If a password was provided, the password was wrong",
                "{secret:?}"
            );
        }
    }

    #[test]
    fn a_server_echoing_a_credential_has_it_removed() {
        let r = with("dana", "wrong");
        let basic =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "dana:wrong");
        let said = quote(&format!(
            "login dana:wrong refused; password=wrong; {{\"password\":\"wrong\"}}; Basic {basic}"
        ));
        assert_eq!(
            r.render(&format!("the token service said {said}: wrong password")),
            "the token service said login dana:[redacted] refused; password=[redacted]; \
             {\"password\":\"[redacted]\"}; Basic [redacted]: wrong password"
        );
    }

    #[test]
    fn distinctive_secrets_and_jwts_go_everywhere_and_only_as_whole_tokens() {
        let mut r = with("dana", "glpat-Hq7ZtR2wXk9LmP4sVb6N");
        r.add_issued(JWT);
        let text = format!(
            "a glpat-Hq7ZtR2wXk9LmP4sVb6N b {JWT} c eyJonly keyJ.x {}",
            quote("token=glpat-Hq7ZtR2wXk9LmP4sVb6N&x")
        );
        assert_eq!(
            r.render(&text),
            "a [redacted] b [redacted] c eyJonly keyJ.x token=[redacted]&x"
        );
        // A longer token that merely starts with it is another token.
        assert_eq!(
            r.render("glpat-Hq7ZtR2wXk9LmP4sVb6NX"),
            "glpat-Hq7ZtR2wXk9LmP4sVb6NX"
        );
        // An issued token's signature alone.
        let sig = JWT.rsplit('.').next().unwrap();
        assert_eq!(r.render(&quote(&format!("sig {sig}"))), "sig [redacted]");
    }

    #[test]
    fn marks_never_reach_the_output() {
        let r = Redactor::default();
        let text = format!("a {} b {}", quote("x\u{E000}y"), quote(""));
        assert_eq!(r.render(&text), "a xy b ");
        assert_eq!(r.render("stray \u{E001}close"), "stray close");
    }

    #[test]
    fn distinctive_means_cannot_be_a_word() {
        let d = |s: &str| Needle::credential(s).distinctive;
        assert!(d("glpat-abc"));
        assert!(d("gldt-Fz8kQw3RnV6yTm2LpX5c"));
        assert!(d("Summer2024-ok"));
        assert!(!d("wrong"));
        assert!(!d("correcthorsebattery"));
        assert!(
            !d("$CI_REGISTRY_PASSWORD"),
            "an unexpanded variable is doctor's word too"
        );
        assert!(!d("hunter2"));
    }
}
