//! Probe 3: the login at the realm (what `docker login` does), and reading the token it returns.

use super::*;

impl Doctor {
    /// A token request to `realm_url` for `scope` (none: the login) with `auth`.
    pub(super) async fn token_request(
        &self,
        realm_url: &str,
        service: &str,
        scope: Option<&str>,
        user: &str,
        auth: Option<String>,
    ) -> Result<Answer, NetError> {
        let mut query = format!(
            "service={}&client_id={CLIENT_ID}&account={}",
            challenge::percent_encode(service),
            challenge::percent_encode(user)
        );
        if let Some(s) = scope {
            query.push_str("&scope=");
            query.push_str(&challenge::percent_encode(s));
        }
        let sep = if realm_url.contains('?') { '&' } else { '?' };
        let headers: Vec<_> = auth
            .into_iter()
            .map(|a| (header::AUTHORIZATION, a))
            .collect();
        self.http
            .send(Method::GET, &format!("{realm_url}{sep}{query}"), &headers)
            .await
    }

    /// The login `docker login` does: the realm without a scope. Returns the realm URL to use
    /// from then on (the redirect target after an `auth_redirect`), or `None` when the run ends.
    pub(super) async fn login(&mut self, realm: &Realm, creds: &Creds) -> Option<String> {
        let auth = basic_header(&creds.user, &creds.secret);
        let mut url = realm.url.clone();
        let mut answer = self
            .realm_call(&url, &realm.service, None, &creds.user, Some(auth.clone()))
            .await?;
        if answer.status.is_redirection() {
            let location = answer.header(&header::LOCATION).unwrap_or("").to_owned();
            let target = resolve(&url, &location);
            let shown = target
                .as_deref()
                .and_then(|t| t.parse::<Uri>().ok())
                .and_then(|u| Some(format!("{}://{}", u.scheme_str()?, u.authority()?)))
                .map_or_else(|| "an unusable Location".into(), |o| quote(&o));
            let realm_origin = url
                .parse::<Uri>()
                .ok()
                .and_then(|u| Some(format!("{}://{}", u.scheme_str()?, u.authority()?)))
                .unwrap_or_default();
            self.report.add(
                "auth_redirect",
                Class::Network,
                format!(
                    "a front redirects /jwt/auth: {realm_origin} answers {} with a redirect to \
                     {shown}; clients drop Authorization on a redirect to another host (Go's \
                     client, used by Docker, skopeo, containerd), so GitLab sees an anonymous \
                     login and answers 'access forbidden' (or a token without push: 'denied: \
                     requested access to the resource is denied')",
                    answer.status.as_u16()
                ),
                "serve /jwt/auth on the registry host itself: proxy it to GitLab keeping \
                 Authorization instead of redirecting, or put regrelay in front of the registry \
                 (it serves /jwt/auth on the registry's name and asks GitLab itself)"
                    .into(),
            );
            // The credentials themselves are still worth checking, at the redirect's target.
            // The realm is the target without the redirect's query (doctor sends its own).
            url = target?.split('?').next().unwrap_or_default().to_owned();
            answer = self
                .realm_call(&url, &realm.service, None, &creds.user, Some(auth))
                .await?;
            if answer.status.is_redirection() {
                return None;
            }
        }
        match answer.status {
            StatusCode::OK => {
                let token = self.read_token(&answer)?;
                self.skew_from_token(&answer, &token);
                if token.opaque {
                    self.report.ok(format!(
                        "login: {url} accepts user {} from {} (its token is a proxy session, \
                         e.g. regrelay's, that doctor cannot read)",
                        creds.user, creds.source
                    ));
                } else {
                    self.report.ok(format!(
                        "login: {url} accepts user {} from {}",
                        creds.user, creds.source
                    ));
                }
                Some(url)
            }
            StatusCode::UNAUTHORIZED => {
                self.bad_credentials(&answer, creds);
                None
            }
            StatusCode::FORBIDDEN => {
                self.forbidden_login(&url, &realm.service, &answer, creds)
                    .await;
                None
            }
            _ => {
                self.realm_refusal(&url, &realm.service, &answer);
                None
            }
        }
    }

    /// One realm request; a network failure (`realm_unreachable`), GitLab's failed-login IP ban
    /// or a rate limit is reported and ends the run.
    pub(super) async fn realm_call(
        &mut self,
        url: &str,
        service: &str,
        scope: Option<&str>,
        user: &str,
        auth: Option<String>,
    ) -> Option<Answer> {
        match self.token_request(url, service, scope, user, auth).await {
            Ok(a) if self.limits_refusal(url, &a) => None,
            Ok(a) => Some(a),
            Err(e) => {
                let (cause, fix) = match e {
                    NetError::Tls(_) => (
                        "tls_error",
                        "give the token service's CA with --ca-file (clients need it too)",
                    ),
                    _ => (
                        "realm_unreachable",
                        "the realm in the registry's challenge must be reachable from the \
                         runner: check DNS, firewalls and HTTP proxies (NO_PROXY), or the \
                         registry's auth.token.realm",
                    ),
                };
                self.report.add(
                    cause,
                    Class::Network,
                    format!("the token service {url} does not answer: {e}"),
                    fix.into(),
                );
                None
            }
        }
    }

    /// Reads `{"token": …}`; a missing token is reported.
    pub(super) fn read_token(&mut self, answer: &Answer) -> Option<Token> {
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        let Some(raw) = v["token"].as_str().or_else(|| v["access_token"].as_str()) else {
            self.report.add(
                "realm_error",
                Class::Network,
                "the token service answered 200 without a token: it is not GitLab's /jwt/auth"
                    .into(),
                "check the registry's auth.token.realm".into(),
            );
            return None;
        };
        self.report.redactor.add_issued(raw);
        if let Some(r) = v["refresh_token"].as_str() {
            self.report.redactor.add_issued(r);
        }
        let claims = Some(raw)
            .filter(|raw| raw.split('.').count() == 3)
            .and_then(challenge::jwt_claims)
            .filter(|c| c.is_object());
        Some(Token {
            opaque: claims.is_none(),
            claims,
        })
    }
}
