//! regrelay: a streaming reverse proxy for container registries that preserves and refreshes
//! GitLab registry auth.
//!
//! # Layout
//! Data flows one way: client → [`server`] (listen, TLS, HTTP/1.1 + h2, drain) → [`app`]
//! (dispatch, error → registry JSON) → [`router`] (pure: which handler, what is refused) →
//! [`auth`] (the `/jwt/auth` realm, sealed sessions, minting) and [`proxy`] (headers,
//! `Location`, streaming bodies) → [`upstream`] (the only dialer). Auth's pieces: [`challenge`]
//! (pure: challenges, scopes, JWT `exp`), [`session`] (AEAD-sealed sessions, key ring),
//! [`token`] (upstream token cache, single-flight minting), [`upload`] (long uploads split
//! into parts that each carry a fresh token).
//! Leaves: [`config`] (flags/env/TOML → validated [`config::Config`]), [`tls`], [`body`]
//! (stream wrappers), [`error`] (one error enum, blame → status), [`telemetry`] (logs, access log).
//!
//! Bodies are never collected on the proxy path: a 10 GB layer flows through in frames.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod body;
pub mod challenge;
pub mod config;
pub mod error;
pub mod proxy;
pub mod router;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upload;
pub mod upstream;

pub use app::App;
pub use config::Config;
pub use error::Error;
