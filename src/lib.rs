//! regrelay: a streaming reverse proxy for container registries that preserves and refreshes
//! GitLab registry auth.
//!
//! # Layout
//! Data flows one way: client → [`server`] (accept with a pause when out of descriptors, TLS,
//! HTTP/1.1 + h2, supervision, drain; which budget each request takes; the admin (metrics)
//! listener, drained with the proxy; [`clients`]' fair shares of every shared pool) → [`app`]
//! (dispatch, error → registry JSON) → [`router`] (pure: which handler, what is refused; a
//! registry path parsed once into an [`api_path::ApiPath`] that every later room reads) →
//! [`auth`] (the `/jwt/auth` endpoint), [`access`] (sessions on registry requests, challenges)
//! and [`proxy`] (headers, `Location`, streaming bodies) → [`upstream`] (the only dialer).
//! Several upstreams (the mirror endpoint): [`mirror`] (pure: which upstream a request is for)
//! and [`injected`] (pull credentials regrelay holds); [`cache`] (the authorizing pull-through
//! cache: content by digest, and who may be served it). Auth's pieces: [`mint`] (the token
//! service: pinned realm, redirects, answers mapped), [`logins`] (failed logins: refused
//! credentials remembered, budgets, GitLab's ban), [`challenge`] (pure: challenges, scopes, JWT times), [`session`] (AEAD-sealed sessions, key
//! ring), [`token`] (upstream token cache: single-flight minting, failures remembered, refresh
//! ahead), [`upload`] (long uploads split into parts that each carry a fresh token).
//! A process's life: [`listeners`] (the sockets: taken over, socket-activated or bound),
//! [`lifecycle`] (serving, signals, the handover), [`embedded`] (the same, inside another
//! program: [`embedded::Proxy::start`], as the integration tests run it), [`upgrade`] (upgrades in place: the listening
//! sockets handed to a successor over `--upgrade-socket`; `regrelay upgrade`; `sd_notify`).
//! Leaves: [`config`] (flags/env/TOML → validated [`config::Config`], every mistake reported at
//! once; its rooms: file, validate, limits, origin, network, upstreams, secret files), [`tls`]
//! (the server certificate and upstream trust, reloaded whole), [`lock`] (mutexes that recover
//! from poisoning; read-mostly state is in `arc_swap` cells instead), [`body`]
//! (stream wrappers), [`error`] (one error enum, blame → status), [`telemetry`] (logs, access log),
//! [`healthcheck`] (the `regrelay healthcheck` client), [`doctor`] (`regrelay doctor`: why a CI
//! push fails).
//!
//! Bodies are never collected on the proxy path: a 10 GB layer flows through in frames.
#![forbid(unsafe_code)]

pub mod access;
pub mod api_path;
pub mod app;
pub mod auth;
pub mod body;
pub mod cache;
pub mod challenge;
pub mod clients;
pub mod config;
pub mod doctor;
pub mod embedded;
pub mod error;
pub mod healthcheck;
pub mod injected;
pub mod lifecycle;
pub mod listeners;
pub mod lock;
pub mod logins;
pub mod metrics;
pub mod mint;
pub mod mirror;
pub mod proxy;
pub mod router;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upgrade;
pub mod upload;
pub mod upstream;

pub use app::App;
pub use config::Config;
pub use error::Error;
