//! Probe 5: clocks. `Date` headers and a token's `iat`/`nbf`/`exp` against this runner's clock.

use super::*;

pub(super) fn describe_offset(off: i64) -> String {
    if off > 0 {
        format!("{off} s ahead of this runner's")
    } else {
        format!("{} s behind this runner's", -off)
    }
}

/// An HTTP date (`Date`) in Unix seconds.
pub(super) fn parse_http_date(s: &str) -> Option<i64> {
    httpdate::parse_http_date(s).ok().map(unix)
}

impl Doctor {
    /// A `Date` header more than [`SKEW_LIMIT_SECS`] off the local clock.
    pub(super) fn skew_from_date(&mut self, who: &str, answer: &Answer) {
        let Some(date) = answer.header(&header::DATE).and_then(parse_http_date) else {
            return;
        };
        let offset = date - unix(answer.at);
        if offset.abs() > SKEW_LIMIT_SECS {
            self.clock_skew(format!(
                "the {who}'s clock is {} (its Date header)",
                describe_offset(offset)
            ));
        }
    }

    /// GitLab's `Date` and the token's `iat`/`nbf`/`exp` against the local clock.
    pub(super) fn skew_from_token(&mut self, answer: &Answer, token: &Token) {
        if self.report.has("clock_skew") {
            return;
        }
        let local = unix(answer.at);
        let date = answer.header(&header::DATE).and_then(parse_http_date);
        let claim = |name: &str| token.claims.as_ref().and_then(|c| c.get(name)?.as_i64());
        let (iat, nbf, exp) = (claim("iat"), claim("nbf"), claim("exp"));
        let mut facts = vec![];
        if let Some(iat) = iat {
            let off = iat - local;
            if off.abs() > SKEW_LIMIT_SECS {
                facts.push(format!(
                    "GitLab's clock is {} (the token's iat)",
                    describe_offset(off)
                ));
            }
        } else if let Some(date) = date {
            let off = date - local;
            if off.abs() > SKEW_LIMIT_SECS {
                facts.push(format!(
                    "the token service's clock is {} (its Date header)",
                    describe_offset(off)
                ));
            }
        }
        if let Some(exp) = exp.filter(|e| *e <= local) {
            facts.push(format!(
                "the token was already expired on arrival (exp {} s ago by this runner's clock)",
                local - exp
            ));
        }
        if let Some(nbf) = nbf.filter(|n| *n > local) {
            facts.push(format!(
                "the token is not valid yet by this runner's clock (nbf {} s ahead)",
                nbf - local
            ));
        }
        if !facts.is_empty() {
            self.clock_skew(facts.join("; "));
        }
    }

    pub(super) fn clock_skew(&mut self, what: String) {
        if let Some(f) = self
            .report
            .findings
            .iter_mut()
            .find(|f| f.cause == "clock_skew")
        {
            f.message = format!("{what}; {}", f.message);
            return;
        }
        self.report.add(
            "clock_skew",
            Class::Network,
            format!(
                "{what}: registries allow 60 s of leeway on a token's nbf and exp, and clients \
                 that time tokens by the local clock renew them too late or too early, so logins \
                 and pushes fail with 401s that look like credential problems"
            ),
            "fix NTP on the runner or GitLab host, whichever is wrong (timedatectl status; \
             chrony or systemd-timesyncd)"
                .into(),
        );
    }
}
