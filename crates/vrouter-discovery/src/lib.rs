//! vrouter-discovery: the control plane of docker-vrouter on one host.
//!
//! Pure decision logic (`membership`, `desired`, `diff`, `retention`, `registry`, `peers`,
//! `holder`) sits in
//! the middle; `controller` applies it through `vrouter_kernel`; `run` owns the
//! process and the watchers; `attach` the attach and admin sockets.

pub mod allinone;
pub mod attach;
pub mod controller;
pub mod desired;
pub mod diff;
pub mod encryption;
pub mod gossip;
pub mod holder;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod ownership;
pub mod paths;
pub mod peers;
pub mod placement;
pub mod readiness;
pub mod registry;
pub mod relay;
pub mod retention;
pub mod run;
pub mod safety;
pub mod settings;
pub mod status;
pub mod steer;
pub mod steering;
pub mod transit;
pub mod tunnel;
pub mod underlay;
pub mod wireguard;
