//! GitLab's tag name patterns, as the registry evaluates them: protected tag rules
//! (`meta.tag_deny_access_patterns`) and EE immutable tag rules (`meta.tag_immutable_patterns`)
//! are RE2 regexes that GitLab's container registry (Go) checks with `regexp.MatchString`, a
//! match anywhere in the tag unless the pattern anchors itself.
//!
//! The `regex` crate has RE2's syntax and its guarantee: matching takes time linear in the tag,
//! whatever the pattern, so a pattern from the token service cannot stall doctor. Tags are ASCII
//! (`[A-Za-z0-9_][A-Za-z0-9_.-]*`), so the crate's Unicode-aware `\d`, `\w` and `\b` match them
//! exactly as RE2's ASCII classes do. This room does not decide what a match means (protected or
//! immutable): the tag checks in `tags.rs` do.

use regex::{Regex, RegexBuilder};

/// Largest compiled pattern accepted (bytes of the crate's program); GitLab's rules are short,
/// and a pattern past this is reported as not evaluated rather than compiled.
const MAX_COMPILED_BYTES: usize = 1 << 20;

/// A pattern that compiled, with its source text (for messages).
pub(super) struct TagPattern {
    source: String,
    regex: Regex,
}

impl TagPattern {
    /// Compiles an RE2 pattern; `None` when its syntax is not RE2's (or it is too large).
    pub(super) fn new(source: &str) -> Option<TagPattern> {
        let regex = RegexBuilder::new(source)
            .size_limit(MAX_COMPILED_BYTES)
            .build()
            .ok()?;
        Some(TagPattern {
            source: source.to_owned(),
            regex,
        })
    }

    /// Go's `MatchString`: a match anywhere in `tag`.
    pub(super) fn matches(&self, tag: &str) -> bool {
        self.regex.is_match(tag)
    }
}

/// What a list of patterns says about one tag.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Verdict {
    /// The first pattern the tag matches.
    pub(super) matched: Option<String>,
    /// Patterns that are not RE2 (doctor cannot say whether they match).
    pub(super) unreadable: Vec<String>,
}

/// Checks `tag` against every pattern, in order; stops at the first match.
pub(super) fn check(patterns: &[String], tag: &str) -> Verdict {
    let mut verdict = Verdict::default();
    for source in patterns {
        match TagPattern::new(source) {
            Some(p) if p.matches(tag) => {
                verdict.matched = Some(p.source);
                break;
            }
            Some(_) => {}
            None => verdict.unreadable.push(source.clone()),
        }
    }
    verdict
}

/// The pattern strings of a JSON list: plain strings, or objects naming the pattern in `tag`
/// or `pattern` (both shapes occur in GitLab's history).
pub(super) fn from_json(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            p.as_str()
                .or_else(|| p["tag"].as_str())
                .or_else(|| p["pattern"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_patterns_match_like_go_matchstring() {
        let cases: &[(&str, &str, bool)] = &[
            ("v.*", "v1.2.3", true),
            ("v.*", "release-v1", true),
            ("^v.*", "release-v1", false),
            ("^v[0-9]+\\.[0-9]+$", "v1.22", true),
            ("^v[0-9]+\\.[0-9]+$", "v1.22-rc", false),
            ("^(main|release-\\d+)$", "release-12", true),
            ("^(main|release-\\d+)$", "mainline", false),
            ("latest", "latest", true),
            ("^[^-]+$", "a-b", false),
            ("^x{2,3}$", "xxx", true),
            ("^x{2,3}$", "xxxx", false),
            ("^(?:a|b)*c$", "ababc", true),
            ("(?i)^LATEST$", "latest", true),
            ("^\\w+$", "build_42", true),
            ("^$", "", true),
            ("(?:)", "x", true),
        ];
        for (pattern, tag, want) in cases {
            let p = TagPattern::new(pattern).unwrap_or_else(|| panic!("compile {pattern}"));
            assert_eq!(p.matches(tag), *want, "{pattern} ~ {tag}");
        }
        // Not RE2: backreferences, lookaround, unbalanced syntax.
        for bad in ["(", "a{", "*a", "[a", "(a)\\1", "(?=a)", "\\q"] {
            assert!(TagPattern::new(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn nested_quantifiers_stay_linear() {
        // A backtracking engine takes exponential time on these; RE2 semantics do not.
        let tag = "a".repeat(4000);
        let started = std::time::Instant::now();
        for pattern in ["^(a*)*$b", "^(a|aa|a*)*c$", "^(a+)+b$"] {
            assert!(
                !TagPattern::new(pattern).unwrap().matches(&tag),
                "{pattern}"
            );
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn verdicts_name_the_first_match_and_the_unreadable() {
        let patterns: Vec<String> = ["(a)\\1", "^rc-", "^v\\d", "v"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let v = check(&patterns, "v1.0");
        assert_eq!(v.matched.as_deref(), Some("^v\\d"));
        assert_eq!(v.unreadable, ["(a)\\1"]);
        assert_eq!(check(&patterns[1..2], "main"), Verdict::default());
        let json = serde_json::json!(["^a", {"tag": "^b"}, {"pattern": "^c"}, 7]);
        assert_eq!(from_json(&json), ["^a", "^b", "^c"]);
    }
}
