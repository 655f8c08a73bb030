//! The tag a push will use, against the rules GitLab put in the token's access entry:
//! - protected tags (`meta.tag_deny_access_patterns.push`): patterns this user's role may not
//!   push;
//! - immutable tags (GitLab EE, `meta.tag_immutable_patterns`): patterns whose tags nobody may
//!   overwrite or delete once they exist, so whether the tag exists decides (a `HEAD` of its
//!   manifest with the token GitLab just granted: a read, nothing is written).
//!
//! Patterns are evaluated by [`super::patterns`] (RE2, as GitLab's registry does). This room does
//! not check tags a token does not grant push for (GitLab sends the rules with write grants).

use http::{header, Method, StatusCode};

use super::patterns;
use super::{quote, Class, Doctor, Realm};

/// The manifest media types a `HEAD` accepts: distribution answers 404 for an OCI manifest
/// that the `Accept` header does not name, as if the tag did not exist.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

impl Doctor {
    /// Protected tags: the patterns this user may not push.
    pub(super) fn check_protected_tags(&mut self, project: &str, entry: &serde_json::Value) {
        let patterns = patterns::from_json(&entry["meta"]["tag_deny_access_patterns"]["push"]);
        if patterns.is_empty() {
            return;
        }
        // The patterns are GitLab's words (from the token's claims).
        let list = quote(&patterns.join(", "));
        let fix = "push that tag as a role the protection rule allows (Settings → Packages and \
                   registries → Protected container tags), or pick a tag it does not cover";
        let Some(tag) = self.setup.tag.clone() else {
            self.report.add(
                "protected_tag",
                Class::Note,
                format!(
                    "this user may not push tags of {project} matching {list}: the registry will \
                     refuse those pushes (no --tag or CI_COMMIT_REF_SLUG to check)"
                ),
                fix.into(),
            );
            return;
        };
        let verdict = patterns::check(&patterns, &tag);
        if let Some(p) = verdict.matched.as_deref().map(quote) {
            self.report.add(
                "protected_tag",
                Class::Credentials,
                format!(
                    "tag {tag} matches the protected tag pattern {p} of {project}: this user's \
                     role may not push it (GitLab put {p} in the token's \
                     tag_deny_access_patterns), so the manifest PUT will be denied"
                ),
                fix.into(),
            );
            return;
        }
        self.report.add(
            "protected_tag",
            Class::Note,
            format!(
                "this user may not push tags of {project} matching {list}; tag {tag} is not one \
                 of them{}",
                unread(&verdict.unreadable)
            ),
            fix.into(),
        );
    }

    /// Immutable tags (EE): a tag that matches and already exists cannot be pushed again.
    /// `token` is the registry token GitLab granted for `project` (pull included).
    pub(super) async fn check_immutable_tags(
        &mut self,
        realm: &Realm,
        token: &str,
        project: &str,
        entry: &serde_json::Value,
    ) {
        let patterns = patterns::from_json(&entry["meta"]["tag_immutable_patterns"]);
        if patterns.is_empty() {
            return;
        }
        // The patterns are GitLab's words (from the token's claims).
        let list = quote(&patterns.join(", "));
        let fix = "push a tag that is new each time (put $CI_COMMIT_SHORT_SHA or \
                   $CI_PIPELINE_IID in it) and move mutable names like latest out of the rule's \
                   reach, or ask a project Owner to change the rule (Settings → Packages and \
                   registries → Container registry → tag protection rules)";
        let Some(tag) = self.setup.tag.clone() else {
            self.report.add(
                "immutable_tag",
                Class::Note,
                format!(
                    "tags of {project} matching {list} are immutable: once pushed, nobody can \
                     overwrite or delete them (no --tag or CI_COMMIT_REF_SLUG to check)"
                ),
                fix.into(),
            );
            return;
        };
        let verdict = patterns::check(&patterns, &tag);
        let Some(p) = verdict.matched.as_deref().map(quote) else {
            self.report.add(
                "immutable_tag",
                Class::Note,
                format!(
                    "tags of {project} matching {list} are immutable; tag {tag} is not one of \
                     them{}",
                    unread(&verdict.unreadable)
                ),
                fix.into(),
            );
            return;
        };
        let rule = format!(
            "tag {tag} matches the immutable tag pattern {p} of {project} (GitLab put it in the \
             token's tag_immutable_patterns)"
        );
        match self.tag_exists(realm, token, project, &tag).await {
            Some(false) => self.report.add(
                "immutable_tag",
                Class::Note,
                format!(
                    "{rule}: {tag} does not exist yet, so its first push works; every later \
                     push of {tag} (a retried pipeline, the same ref built again) will be \
                     refused, and it can never be deleted"
                ),
                fix.into(),
            ),
            Some(true) => self.report.add(
                "immutable_tag",
                Class::Credentials,
                format!(
                    "the push of tag {tag} will be refused: {rule}, and {tag} already exists in \
                     {project}; an existing immutable tag cannot be overwritten or deleted, by \
                     anyone"
                ),
                fix.into(),
            ),
            None => self.report.add(
                "immutable_tag",
                Class::Credentials,
                format!(
                    "the push of tag {tag} will be refused if {tag} already exists in \
                     {project} (the registry did not say): {rule}; an existing immutable tag \
                     cannot be overwritten or deleted, by anyone"
                ),
                fix.into(),
            ),
        }
    }

    /// `HEAD /v2/<project>/manifests/<tag>` with `token`: `None` when the registry does not say.
    async fn tag_exists(
        &mut self,
        realm: &Realm,
        token: &str,
        project: &str,
        tag: &str,
    ) -> Option<bool> {
        let url = format!("{}/v2/{project}/manifests/{tag}", realm.base);
        let headers = [
            (header::AUTHORIZATION, format!("Bearer {token}")),
            (header::ACCEPT, MANIFEST_TYPES.to_owned()),
        ];
        match self.http.send(Method::HEAD, &url, &headers).await {
            Ok(a) if a.status == StatusCode::OK => Some(true),
            Ok(a) if a.status == StatusCode::NOT_FOUND => Some(false),
            _ => None,
        }
    }
}

/// " (doctor could not evaluate …)" for patterns that are not RE2, else nothing.
fn unread(unreadable: &[String]) -> String {
    if unreadable.is_empty() {
        return String::new();
    }
    format!(
        " (doctor could not evaluate {}: not RE2 syntax; compare yourself)",
        quote(&unreadable.join(", "))
    )
}
