//! vrouter-discovery: the control plane of docker-vrouter on one host.
//!
//! Pure decision logic (`desired`, `diff`, `retention`, `registry`, `peers`) sits in
//! the middle; `controller` applies it through `vrouter_kernel`; `run` owns the
//! process, the attach socket and the watchers.

pub mod allinone;
pub mod controller;
pub mod desired;
pub mod diff;
pub mod gossip;
pub mod http;
pub mod metrics;
pub mod ownership;
pub mod peers;
pub mod readiness;
pub mod registry;
pub mod relay;
pub mod retention;
pub mod run;
pub mod settings;
pub mod status;
pub mod underlay;
