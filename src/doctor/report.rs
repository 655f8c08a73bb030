//! The findings doctor makes, their classes and the exit status they add up to; the report as
//! text or JSON.

use super::*;

/// What a finding means for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Class {
    /// Worth knowing; changes nothing.
    Note,
    /// Credentials, scopes, roles, project settings (exit 1).
    Credentials,
    /// Network, TLS, fronts, clocks, server configuration (exit 2).
    Network,
}

/// One cause with its fix.
#[derive(Debug, Clone)]
pub(super) struct Finding {
    pub(super) cause: &'static str,
    pub(super) class: Class,
    pub(super) message: String,
    pub(super) fix: String,
}

/// The overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    Credentials,
    Network,
}

impl Status {
    pub(super) fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Credentials => "credentials",
            Status::Network => "network",
        }
    }

    pub(super) fn exit_code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Credentials => 1,
            Status::Network => 2,
        }
    }
}

#[derive(Default)]
pub(super) struct Report {
    /// What was verified and worked, in order.
    pub(super) checks: Vec<String>,
    pub(super) findings: Vec<Finding>,
    pub(super) redactor: Redactor,
}

impl Report {
    pub(super) fn ok(&mut self, line: impl Into<String>) {
        self.checks.push(line.into());
    }

    pub(super) fn add(&mut self, cause: &'static str, class: Class, message: String, fix: String) {
        self.findings.push(Finding {
            cause,
            class,
            message,
            fix,
        });
    }

    /// Renders every text (quoted server text searched for secrets, marks removed) before the
    /// output is assembled: JSON escaping would hide a secret holding `"` or `\\` from a pass
    /// over the rendered output.
    pub(super) fn render_all(&mut self) {
        let r = &self.redactor;
        for c in &mut self.checks {
            *c = r.render(c);
        }
        for f in &mut self.findings {
            f.message = r.render(&f.message);
            f.fix = r.render(&f.fix);
        }
    }

    pub(super) fn has(&self, cause: &str) -> bool {
        self.findings.iter().any(|f| f.cause == cause)
    }

    pub(super) fn status(&self) -> Status {
        match self.findings.iter().map(|f| f.class).max() {
            Some(Class::Network) => Status::Network,
            Some(Class::Credentials) => Status::Credentials,
            _ => Status::Ok,
        }
    }
}

impl Doctor {
    pub(super) fn summary(&self) -> String {
        let status = self.report.status();
        let errors: Vec<&str> = self
            .report
            .findings
            .iter()
            .filter(|f| f.class != Class::Note)
            .map(|f| f.cause)
            .collect();
        match status {
            Status::Ok => match &self.setup.project {
                Some(p)
                    if self
                        .report
                        .checks
                        .iter()
                        .any(|c| c.contains("pull and push on")) =>
                {
                    format!("ok: pull and push on {p} work with these credentials")
                }
                _ => "ok: no problem found".into(),
            },
            Status::Credentials => format!(
                "credential or permission problem (exit 1): {}",
                errors.join(", ")
            ),
            Status::Network => format!("network or server problem (exit 2): {}", errors.join(", ")),
        }
    }

    pub(super) fn header_line(&self) -> String {
        let creds = match &self.setup.creds {
            Some(c) => format!("user {} from {}", c.user, c.source),
            None => "none found".into(),
        };
        format!(
            "regrelay doctor: registry {} (from {}), project {}, credentials: {creds}",
            self.setup.target.authority,
            self.setup.target_source,
            self.setup.project.as_deref().unwrap_or("(none)"),
        )
    }

    pub(super) fn text(&self) -> String {
        let mut out = vec![self.header_line()];
        for c in &self.report.checks {
            out.push(format!("ok    {c}"));
        }
        let mut findings: Vec<&Finding> = self.report.findings.iter().collect();
        findings.sort_by_key(|f| std::cmp::Reverse(f.class));
        for f in findings {
            let label = if f.class == Class::Note {
                "note"
            } else {
                "FAIL"
            };
            out.push(format!(
                "{label}  {}: {}. Fix: {}.",
                f.cause,
                f.message.trim_end_matches('.'),
                f.fix.trim_end_matches('.')
            ));
        }
        out.push(format!("summary: {}", self.summary()));
        out.join("\n")
    }

    pub(super) fn json(&self) -> String {
        let status = self.report.status();
        let findings: Vec<serde_json::Value> = self
            .report
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "cause": f.cause,
                    "severity": if f.class == Class::Note { "note" } else { "error" },
                    "class": match f.class {
                        Class::Note => "note",
                        Class::Credentials => "credentials",
                        Class::Network => "network",
                    },
                    "message": f.message,
                    "fix": f.fix,
                })
            })
            .collect();
        serde_json::json!({
            "status": status.name(),
            "exit_code": status.exit_code(),
            "registry": self.setup.target.authority,
            "project": self.setup.project,
            "credentials": self.setup.creds.as_ref().map(|c| serde_json::json!({
                "source": c.source, "user": c.user,
            })),
            "checks": self.report.checks,
            "findings": findings,
            "summary": self.summary(),
        })
        .to_string()
    }
}
