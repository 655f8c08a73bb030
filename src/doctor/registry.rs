//! Probes 1 and 2: the registry's `/v2/` challenge, and whether its realm is reachable on the
//! name it gives (a `--public-url` that differs from the name in use is told from a token service
//! that is down).

use super::*;

impl Doctor {
    /// `GET /v2/`: the registry's challenge, or the finding that ends the run.
    pub(super) async fn probe_registry(&mut self) -> Option<Realm> {
        let target = self.setup.target.clone();
        let schemes: Vec<&str> = match target.scheme {
            Some(s) => vec![s],
            None if target.loopback => vec!["https", "http"],
            None => vec!["https"],
        };
        let mut failures = vec![];
        let mut found = None;
        for scheme in &schemes {
            let url = format!("{scheme}://{}/v2/", target.authority);
            match self.http.send(Method::GET, &url, &[]).await {
                Ok(a) => {
                    found = Some((format!("{scheme}://{}", target.authority), a));
                    break;
                }
                Err(e) => failures.push((url, e)),
            }
        }
        let tls = failures.iter().find(|(_, e)| matches!(e, NetError::Tls(_)));
        // https failed in TLS and plain http got a 400 ("an HTTP request to an HTTPS server") or
        // nothing: an https registry whose certificate is not trusted here.
        let tls_only = tls.is_some()
            && found
                .as_ref()
                .is_none_or(|(_, a)| a.status == StatusCode::BAD_REQUEST);
        let found = found.filter(|_| !tls_only);
        let Some((base, answer)) = found else {
            let detail: Vec<String> = failures.iter().map(|(u, e)| format!("{u}: {e}")).collect();
            if let Some((url, e)) = tls {
                self.report.add(
                    "tls_error",
                    Class::Network,
                    format!("{url}: {e}"),
                    "give the registry's CA with --ca-file (and to the clients: \
                     /etc/docker/certs.d/HOST/ca.crt); if the registry speaks plain http, say \
                     http://HOST explicitly (clients then need it in insecure-registries)"
                        .into(),
                );
            } else {
                self.report.add(
                    "registry_unreachable",
                    Class::Network,
                    format!(
                        "the registry {} ({}) does not answer: {}",
                        target.authority,
                        self.setup.target_source,
                        detail.join("; ")
                    ),
                    "check the host and port (CI_REGISTRY), DNS, firewalls and HTTP proxies \
                     between the runner and the registry, and that the registry runs"
                        .into(),
                );
            }
            return None;
        };
        self.skew_from_date("registry", &answer);
        let scheme = base.split("://").next().unwrap_or("https");
        self.registry_origin = Some(host_port(&target.authority, scheme));
        let url = format!("{base}/v2/");
        if self.limits_refusal(&url, &answer) {
            return None;
        }
        match answer.status {
            StatusCode::OK => {
                self.report.add(
                    "no_auth",
                    Class::Note,
                    format!("{url} answers 200 without credentials: the registry asks for no auth"),
                    "nothing to do, unless it should ask (then its auth section is missing)".into(),
                );
                None
            }
            StatusCode::UNAUTHORIZED => {
                if let Some(c) = answer.bearer() {
                    let Some(realm) = c.get("realm").filter(|r| {
                        r.parse::<Uri>().is_ok_and(|u| {
                            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                        })
                    }) else {
                        self.report.add(
                            "bad_challenge",
                            Class::Network,
                            format!("{url} asks for a Bearer token without a usable realm URL"),
                            "set the registry's auth.token.realm to GitLab's https://GITLAB/jwt/auth"
                                .into(),
                        );
                        return None;
                    };
                    let service = c.get("service").unwrap_or("").to_owned();
                    self.report.ok(format!(
                        "registry {base}: /v2/ asks for a Bearer token from {realm} (service {service})"
                    ));
                    return Some(Realm {
                        base,
                        url: realm.to_owned(),
                        service,
                    });
                }
                if answer.basic() {
                    self.check_basic_registry(&base).await;
                    return None;
                }
                self.report.add(
                    "not_a_registry",
                    Class::Network,
                    format!("{url} answers 401 without a Bearer or Basic challenge"),
                    "a proxy in front of the registry may answer instead of it: check what \
                     listens on this address"
                        .into(),
                );
                None
            }
            status => {
                let api = answer
                    .headers
                    .contains_key("docker-distribution-api-version");
                let what = answer
                    .header(&header::CONTENT_TYPE)
                    .map_or_else(|| "no content type".into(), quote);
                self.report.add(
                    "not_a_registry",
                    Class::Network,
                    format!(
                        "{url} answers {status} ({what}{}): not the registry API's 401 or 200",
                        if api { ", a registry" } else { "" }
                    ),
                    format!(
                        "check that {} ({}) is the registry's address, not GitLab's web UI, a \
                         login page or a load balancer's error page; a 5xx is the registry or a \
                         proxy failing",
                        target.authority, self.setup.target_source
                    ),
                );
                None
            }
        }
    }

    /// A registry with Basic auth (not GitLab's): checks the credentials on `/v2/` directly.
    pub(super) async fn check_basic_registry(&mut self, base: &str) {
        let url = format!("{base}/v2/");
        let Some(creds) = self.setup.creds.clone() else {
            self.report.add(
                "no_credentials",
                Class::Credentials,
                format!(
                    "{url} asks for Basic credentials and none were found ({})",
                    self.setup.no_creds_detail
                ),
                "docker login to the registry first".into(),
            );
            return;
        };
        let auth = basic_header(&creds.user, &creds.secret);
        match self
            .http
            .send(Method::GET, &url, &[(header::AUTHORIZATION, auth)])
            .await
        {
            Ok(a) if a.status == StatusCode::OK => self.report.ok(format!(
                "registry {base} uses Basic auth (not GitLab's token auth) and accepts user {}",
                creds.user
            )),
            Ok(a) => self.report.add(
                "bad_credentials",
                Class::Credentials,
                format!(
                    "{url} (Basic auth, not GitLab's token auth) refuses user {} from {}: {}",
                    creds.user, creds.source, a.status
                ),
                "use the credentials this registry's htpasswd knows".into(),
            ),
            Err(e) => self.report.add(
                "registry_unreachable",
                Class::Network,
                format!("{url}: {e}"),
                "check the network between the runner and the registry".into(),
            ),
        }
    }

    /// The realm on another host than the one addressed: GitLab's normal layout, or a proxy
    /// (regrelay) whose public name is not the one clients use. False when the run ends here
    /// (the realm cannot be reached from here, and the registry's address serves it itself).
    pub(super) async fn check_realm_host(&mut self, realm: &Realm) -> bool {
        let realm_uri: Uri = realm.url.parse().expect("checked in probe_registry");
        let realm_scheme = realm_uri.scheme_str().unwrap_or("https");
        let realm_auth = realm_uri
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        let reg_scheme = realm.base.split("://").next().unwrap_or("https");
        let reg_auth = self.setup.target.authority.clone();
        if host_port(&realm_auth, realm_scheme) == host_port(&reg_auth, reg_scheme) {
            return true;
        }
        let origin = format!("{realm_scheme}://{realm_auth}");
        let named_fix = format!(
            "add the name clients use to regrelay: --public-url {reg_scheme}://{reg_auth} \
             (--public-url may be given once per name clients use: each client gets the realm \
             of the name it used), or make clients use {realm_auth}"
        );
        match self
            .http
            .send(Method::GET, &format!("{origin}/v2/"), &[])
            .await
        {
            Ok(a)
                if a.status == StatusCode::UNAUTHORIZED
                    && a.bearer()
                        .is_some_and(|c| c.get("service").unwrap_or("") == realm.service) =>
            {
                self.report.add(
                    "public_url_mismatch",
                    Class::Network,
                    format!(
                        "the registry at {reg_auth} sends clients to authenticate at \
                         {realm_auth} ({}), which is itself a registry endpoint: the proxy's \
                         public URL (regrelay --public-url) is not the name clients use; clients \
                         get tokens from {realm_auth} while they push to {reg_auth}, which shows \
                         as a bare 401 on the upload PUT",
                        realm.url
                    ),
                    named_fix,
                );
                true
            }
            Err(e) if !matches!(e, NetError::Tls(_)) && self.serves_realm_itself(realm).await => {
                self.report.add(
                    "public_url_mismatch",
                    Class::Network,
                    format!(
                        "the realm named in the challenge of {reg_auth}, {} (host {realm_auth}), \
                         is not reachable from here ({e}), and it differs from the registry \
                         address in use, {reg_auth}, which serves that token endpoint itself: \
                         it is a proxy (regrelay) whose --public-url names {realm_auth}, not the \
                         name this job reaches it by, so docker login here fails before any \
                         credential is checked (the token service is not at fault; doctor \
                         checked no login)",
                        realm.url
                    ),
                    format!(
                        "set regrelay's --public-url to the name clients use, --public-url \
                         {reg_scheme}://{reg_auth}, or add that name as a further --public-url \
                         (it may be given once per name clients use); or make {realm_auth} \
                         resolve and reach regrelay from the runners"
                    ),
                );
                false
            }
            _ => {
                self.report.add(
                    "realm_on_other_host",
                    Class::Note,
                    format!(
                        "clients will authenticate at {realm_auth} ({}), not at the registry \
                         host {reg_auth}: that is GitLab's usual layout, but that host must be \
                         reachable from every client and its certificate trusted",
                        realm.url
                    ),
                    format!(
                        "nothing, if {realm_auth} is reachable from the runners (doctor reached \
                         it from here if no other finding says otherwise)"
                    ),
                );
                true
            }
        }
    }

    /// True when the registry's own address answers the realm's path like a token service (a
    /// token, or a refusal of the anonymous login: not the 404 a registry gives for a path it
    /// does not serve): a proxy in front of the registry serves the realm there.
    pub(super) async fn serves_realm_itself(&mut self, realm: &Realm) -> bool {
        let Ok(uri) = realm.url.parse::<Uri>() else {
            return false;
        };
        let url = format!("{}{}", realm.base, uri.path());
        // Anonymous, as `docker login` starts: no credential, nothing the IP ban counts.
        let Ok(answer) = self
            .token_request(&url, &realm.service, None, "", None)
            .await
        else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        for field in ["token", "access_token", "refresh_token"] {
            if let Some(t) = v[field].as_str() {
                self.report.redactor.add_issued(t);
            }
        }
        match answer.status {
            StatusCode::OK => v["token"].is_string() || v["access_token"].is_string(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => {
                true
            }
            _ => false,
        }
    }
}
