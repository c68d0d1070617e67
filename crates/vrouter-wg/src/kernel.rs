//! Kernel WireGuard: the link (kind "wireguard") over rtnetlink, its configuration
//! over generic netlink (WG_CMD_SET_DEVICE / WG_CMD_GET_DEVICE).

use vrouter_kernel::Kernel;

use crate::{DeviceConfig, PeerStats, WgError};

pub(crate) struct Device {}

impl Device {
    pub(crate) async fn open(kernel: &Kernel, cfg: &DeviceConfig) -> Result<Device, WgError> {
        let _ = (kernel, cfg);
        Err(WgError::NoKernelWireGuard("not built yet".into()))
    }
    pub(crate) async fn apply(&self, kernel: &Kernel, cfg: &DeviceConfig) -> Result<(), WgError> {
        let _ = (kernel, cfg);
        Ok(())
    }
    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        Vec::new()
    }
}
