//! The integration tests: one binary, a module per scenario (each module's docs say what it
//! proves), sharing the rig in `tests/support/` (real docker-registry, the GitLab stand-in, nginx,
//! skopeo, containerd, docker). One binary compiles and links the rig once; `cargo test --test it
//! <module>::` runs one scenario.

#[path = "../support/mod.rs"]
mod support;

mod auth_realm;
mod buffered_upload;
mod cache;
mod cache_object_store;
mod cache_shared;
mod cli;
mod clock_skew;
mod confinement;
mod containerd_smoke;
mod dependency_proxy;
mod deploy_k8s;
mod doctor;
mod fair_shares;
mod fd_exhaustion;
mod gitlab_stand_in;
mod header_tricks;
mod healthcheck;
mod hostile;
mod hostile_soak;
mod https_upstream;
mod image;
mod limits;
mod login_ban;
mod messages;
mod metrics;
mod mirror;
mod proxy_semantics;
mod public_names;
mod push_denied;
mod push_pull;
mod readiness;
mod reload;
mod rolling;
mod secrets;
mod session_bounds;
mod shutdown;
mod streaming;
mod systemd_unit;
mod token_faults;
mod token_refresh;
mod upgrade;
mod upload_edges;
mod upstream_pool;
mod workers;
