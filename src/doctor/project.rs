//! Probe 4: the token for the project's pull and push, what GitLab dropped and why, and a token
//! doctor cannot read tried on the registry itself.

use super::*;

impl Doctor {
    /// The token for `repository:<project>:pull,push`, and what GitLab dropped.
    pub(super) async fn check_project(
        &mut self,
        realm: &Realm,
        url: &str,
        creds: &Creds,
        project: &str,
    ) {
        let scope = format!("repository:{project}:pull,push");
        let auth = basic_header(&creds.user, &creds.secret);
        let Some(answer) = self
            .realm_call(url, &realm.service, Some(&scope), &creds.user, Some(auth))
            .await
        else {
            return;
        };
        match answer.status {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => {
                let message = answer.message();
                if message.contains("protected repository path") {
                    self.report.add(
                        "protected_path",
                        Class::Credentials,
                        format!(
                            "GitLab refuses a push token for {project}: 403 \"{message}\" (a \
                             protected container repository rule; this role is below its \
                             minimum)"
                        ),
                        "push as a role the rule allows (Settings → Packages and registries → \
                         Protected container repositories), or push to another path"
                            .into(),
                    );
                } else {
                    self.realm_refusal(url, &realm.service, &answer);
                }
                return;
            }
            StatusCode::UNAUTHORIZED => {
                self.bad_credentials(&answer, creds);
                return;
            }
            _ => {
                self.realm_refusal(url, &realm.service, &answer);
                return;
            }
        }
        let Some(token) = self.read_token(&answer) else {
            return;
        };
        self.skew_from_token(&answer, &token);
        let raw = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let (pull, push, entry) = match &token.claims {
            Some(claims) => {
                let entry = claims["access"].as_array().and_then(|a| {
                    a.iter()
                        .find(|e| e["type"] == "repository" && e["name"] == project)
                        .cloned()
                });
                let has = |action: &str| {
                    entry.as_ref().is_some_and(|e| {
                        e["actions"]
                            .as_array()
                            .is_some_and(|acts| acts.iter().any(|a| a == action || a == "*"))
                    })
                };
                (has("pull"), has("push"), entry)
            }
            None => match self.try_on_registry(realm, &raw, project).await {
                Some((pull, push)) => (pull, push, None),
                None => return,
            },
        };
        let kind = token
            .claims
            .as_ref()
            .and_then(|c| c["auth_type"].as_str())
            .and_then(Kind::from_auth_type)
            .unwrap_or_else(|| Kind::guess(creds));
        if pull && push {
            self.report.ok(format!(
                "pull and push on {project} granted to user {}",
                creds.user
            ));
            if let Some(entry) = &entry {
                self.check_protected_tags(project, entry);
                self.check_immutable_tags(realm, &raw, project, entry).await;
            }
            return;
        }
        if pull {
            self.report
                .ok(format!("pull on {project} granted to user {}", creds.user));
        }
        self.explain_drop(kind, creds, project, pull, push).await;
    }

    /// A token doctor cannot read (a regrelay session): a pull and a cancelled upload on the
    /// registry say what it allows. `None` when the registry gave no usable answer.
    pub(super) async fn try_on_registry(
        &mut self,
        realm: &Realm,
        token: &str,
        project: &str,
    ) -> Option<(bool, bool)> {
        let bearer = (header::AUTHORIZATION, format!("Bearer {token}"));
        let base = &realm.base;
        let pull = self
            .http
            .send(
                Method::GET,
                &format!("{base}/v2/{project}/tags/list"),
                std::slice::from_ref(&bearer),
            )
            .await;
        let push = self
            .http
            .send(
                Method::POST,
                &format!("{base}/v2/{project}/blobs/uploads/"),
                std::slice::from_ref(&bearer),
            )
            .await;
        let (pull, push) = match (pull, push) {
            (Ok(pull), Ok(push)) => (pull, push),
            (Err(e), _) | (_, Err(e)) => {
                self.report.add(
                    "registry_unreachable",
                    Class::Network,
                    format!("{base} stopped answering while doctor tried the token: {e}"),
                    "check the registry and the network".into(),
                );
                return None;
            }
        };
        if push.status == StatusCode::ACCEPTED {
            if let Some(location) = push
                .header(&header::LOCATION)
                .and_then(|l| resolve(base, l))
            {
                // Cancel the upload doctor started.
                let _ = self
                    .http
                    .send(Method::DELETE, &location, std::slice::from_ref(&bearer))
                    .await;
            }
        }
        let allowed = |a: &Answer, ok: &[StatusCode]| -> Option<bool> {
            if ok.contains(&a.status) {
                Some(true)
            } else if matches!(a.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                Some(false)
            } else {
                None
            }
        };
        let pull_ok = allowed(&pull, &[StatusCode::OK, StatusCode::NOT_FOUND]);
        let push_ok = allowed(&push, &[StatusCode::ACCEPTED, StatusCode::CREATED]);
        match (pull_ok, push_ok) {
            (Some(pull), Some(push)) => {
                self.report.ok(format!(
                    "the token service's token is opaque (a proxy session): tried on the \
                     registry instead: pull {}, push {}",
                    if pull { "allowed" } else { "denied" },
                    if push { "allowed" } else { "denied" }
                ));
                Some((pull, push))
            }
            _ => {
                self.report.add(
                    "grants_unknown",
                    Class::Note,
                    format!(
                        "the token is opaque (a proxy session) and the registry answered {} to \
                         a pull and {} to an upload: doctor cannot tell what is granted",
                        pull.status.as_u16(),
                        push.status.as_u16()
                    ),
                    "push an image to check".into(),
                );
                None
            }
        }
    }
}
