//! Which `vxlan<VNI>` devices are discovery's to change or delete.
//!
//! A name alone proves nothing: another tool, an operator, or a router's owner who
//! wrote a `devices` list into the shared discovery.json may have made (or named) a
//! `vxlan<N>`. Discovery stamps every device it makes with an alias
//! ([`marker`], IFLA_IFALIAS, `ip -d link` shows it) and only touches devices that
//! carry it.
//!
//! Upgrade: devices made by versions before the marker have no alias. Discovery adopts
//! such a device (stamps it and from then on treats it as its own) only when both hold:
//! - its VNI is recorded in discovery's private record of the devices it made
//!   (`devices.json` in the private directory; on the first start after the upgrade
//!   that record is seeded once from discovery.json's `devices`, which the older
//!   version wrote);
//! - it is exactly what discovery would build now (VNI, port, underlay device, local
//!   address, learning, MTU; only "down" may differ).
//!
//! Anything else holding the name is foreign: it is never deleted or changed, and the
//! VNI is refused on this host with an event naming the link.

use crate::diff::{device_action, DeviceAction, DeviceSpec};
use std::collections::BTreeSet;
use tracing::warn;
use vrouter_kernel::Link;
use vrouter_state::{StateDir, Vni};

/// Discovery's private record of the devices it made.
pub const DEVICES_FILE: &str = "devices.json";

/// The alias discovery sets on each `vxlan<VNI>` it makes.
pub fn marker(vni: Vni) -> String {
    format!("docker-vrouter vni={vni}")
}

/// What discovery may do with the link holding a device's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// No such link: discovery may create it.
    Absent,
    /// Carries our marker.
    Ours,
    /// An unmarked device of an older version, recorded and exactly as we would build
    /// it: stamp it, then it is ours.
    Adopt,
    /// Not ours: never delete or change it. The string says why, for the event.
    Foreign(String),
}

/// Decides who owns `have`, the link called `vxlan<want.vni>`. `recorded`: the VNI is
/// in discovery's private record of the devices it made.
pub fn owner(want: &DeviceSpec, have: Option<&Link>, recorded: bool) -> Owner {
    let Some(link) = have else {
        return Owner::Absent;
    };
    let mark = marker(want.vni);
    match link.alias.as_deref() {
        Some(a) if a == mark => return Owner::Ours,
        Some(a) => {
            return Owner::Foreign(format!(
                "{} exists with alias \"{a}\", not \"{mark}\": docker-vrouter did not make it",
                link.name
            ))
        }
        None => {}
    }
    let exact = match device_action(want, Some(link)) {
        DeviceAction::Keep => true,
        DeviceAction::Adjust { local, mtu, .. } => local.is_none() && mtu.is_none(),
        _ => false,
    };
    if recorded && exact {
        return Owner::Adopt;
    }
    let why = if recorded {
        "it has no docker-vrouter marker and differs from what discovery would build"
    } else {
        "it has no docker-vrouter marker and discovery has no record of making it"
    };
    Owner::Foreign(format!(
        "{} (a {} link) exists but {why} (alias \"{mark}\")",
        link.name,
        link.kind.as_deref().unwrap_or("plain")
    ))
}

/// The event message for a refused VNI.
pub fn refusal(vni: Vni, why: &str) -> String {
    format!(
        "VNI {vni} refused on this host: {why}; the link is left untouched. Remove or rename it if it is a leftover (`ip -d link show {name}`), or give the stack another VNI",
        name = vni.vxlan_ifname()
    )
}

/// The VNIs discovery recorded as made by itself. On the first start after an upgrade
/// (no record yet), `legacy` (discovery.json's `devices`, written by the older version)
/// seeds it once.
pub fn recorded(dir: &StateDir, legacy: &[Vni]) -> BTreeSet<Vni> {
    let Some(private) = dir.private() else {
        return BTreeSet::new();
    };
    match private.read(DEVICES_FILE, 1024 * 1024) {
        Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
            Ok(set) => return set,
            Err(e) => warn!(
                "{DEVICES_FILE} in {}: {e}; starting an empty record",
                private.path().display()
            ),
        },
        Ok(None) => {
            let seeded: BTreeSet<Vni> = legacy.iter().copied().collect();
            record(dir, &seeded);
            return seeded;
        }
        Err(e) => warn!("{e}"),
    }
    BTreeSet::new()
}

/// Stores the record when it changed.
pub fn record(dir: &StateDir, vnis: &BTreeSet<Vni>) {
    let Some(private) = dir.private() else {
        return;
    };
    let current: Option<BTreeSet<Vni>> = private
        .read(DEVICES_FILE, 1024 * 1024)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if current.as_ref() == Some(vnis) {
        return;
    }
    let bytes = serde_json::to_vec(vnis).expect("a set of VNIs serialises");
    if let Err(e) = private.write(DEVICES_FILE, &bytes) {
        warn!("cannot record the devices discovery made: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_kernel::VxlanInfo;

    fn want() -> DeviceSpec {
        DeviceSpec {
            vni: Vni::new(1000).unwrap(),
            local: Some("198.18.0.1".parse().unwrap()),
            underlay: 2,
            port: 4789,
            mtu: 1450,
            learning: false,
        }
    }

    fn link(alias: Option<&str>, mtu: u32, up: bool) -> Link {
        Link {
            index: 7,
            name: "vxlan1000".into(),
            kind: Some("vxlan".into()),
            mtu,
            up,
            vxlan: Some(VxlanInfo {
                vni: Vni::new(1000).unwrap(),
                local: Some("198.18.0.1".parse().unwrap()),
                underlay: Some(2),
                port: 4789,
                learning: false,
            }),
            alias: alias.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn only_marked_devices_are_ours() {
        assert_eq!(owner(&want(), None, false), Owner::Absent);
        let mark = marker(want().vni);
        assert_eq!(mark, "docker-vrouter vni=1000");
        assert_eq!(
            owner(&want(), Some(&link(Some(&mark), 1450, true)), false),
            Owner::Ours
        );
        // Marked but with other attributes: still ours (adjusted or replaced as usual).
        assert_eq!(
            owner(&want(), Some(&link(Some(&mark), 1400, true)), false),
            Owner::Ours
        );
        // Another VNI's marker, or someone else's alias: foreign.
        assert!(matches!(
            owner(
                &want(),
                Some(&link(Some("docker-vrouter vni=2000"), 1450, true)),
                true
            ),
            Owner::Foreign(_)
        ));
        let Owner::Foreign(why) = owner(&want(), Some(&link(Some("flannel"), 1450, true)), true)
        else {
            panic!()
        };
        assert!(
            why.contains("vxlan1000") && why.contains("flannel"),
            "{why}"
        );
    }

    #[test]
    fn unmarked_devices_are_adopted_only_when_recorded_and_exact() {
        assert_eq!(
            owner(&want(), Some(&link(None, 1450, true)), true),
            Owner::Adopt
        );
        assert_eq!(
            owner(&want(), Some(&link(None, 1450, false)), true),
            Owner::Adopt,
            "only down"
        );
        let Owner::Foreign(why) = owner(&want(), Some(&link(None, 1450, true)), false) else {
            panic!()
        };
        assert!(why.contains("no record"), "{why}");
        assert!(matches!(
            owner(&want(), Some(&link(None, 1400, true)), true),
            Owner::Foreign(_)
        ));
        let mut dummy = link(None, 1450, true);
        dummy.kind = Some("dummy".into());
        dummy.vxlan = None;
        assert!(matches!(
            owner(&want(), Some(&dummy), true),
            Owner::Foreign(_)
        ));
    }

    #[test]
    fn the_record_lives_in_the_private_dir_and_is_seeded_once() {
        let base = std::env::temp_dir().join(format!("vrt-owned-{}", std::process::id()));
        let private = base.with_extension("private");
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&private);
        std::fs::create_dir_all(&base).unwrap();
        let dir = StateDir::open_discovery(&base, &private).unwrap();
        let v = |n| Vni::new(n).unwrap();
        assert_eq!(recorded(&dir, &[v(1000)]), [v(1000)].into());
        // Seeded once: a later discovery.json list changes nothing.
        assert_eq!(recorded(&dir, &[v(2000)]), [v(1000)].into());
        record(&dir, &[v(1000), v(3000)].into());
        assert_eq!(recorded(&dir, &[]), [v(1000), v(3000)].into());
        assert!(private.join(DEVICES_FILE).is_file());
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&private);
    }
}
