//! The closed vocabularies of the state files: event kinds, peer sources and gossip
//! member states. Each is an enum that reads and writes exactly the strings the files
//! have always held, so the compiler checks every emitter and reader while the files
//! stay byte for byte the same (tests/golden.rs). A value written by a newer version
//! reads as `Other` instead of failing the whole file.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

macro_rules! wire_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $variant:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)*
            /// A value this version does not know (written by a newer one); read only.
            Other(String),
        }

        impl $name {
            /// Every value this version writes.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $s,)*
                    $name::Other(s) => s,
                }
            }

            /// Never fails: an unknown string is kept as `Other`.
            pub fn from_wire(s: &str) -> $name {
                match s {
                    $($s => $name::$variant,)*
                    _ => $name::Other(s.to_string()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok($name::from_wire(&String::deserialize(d)?))
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

wire_enum! {
    /// `kind` of an events.log line: what happened. The `reason` says why, in more
    /// detail (e.g. `conflict_refused` with reason `overlap`).
    pub enum EventKind {
        // Discovery: its own life.
        Started = "started",
        Standby = "standby",
        HostCheck = "host_check",
        ConfigLoaded = "config_loaded",
        ConfigInvalid = "config_invalid",
        UnderlayChanged = "underlay_changed",
        StateUnwritable = "state_unwritable",
        StateWritable = "state_writable",
        DriftRepaired = "drift_repaired",
        Error = "error",
        // Discovery: the gossip mesh.
        MemberJoined = "member_joined",
        MemberFailed = "member_failed",
        MemberLeft = "member_left",
        MemberMigrated = "member_migrated",
        Rejoined = "rejoined",
        GossipRejected = "gossip_rejected",
        LeftMesh = "left_mesh",
        PeerWithdrawn = "peer_withdrawn",
        PeerRouted = "peer_routed",
        // Discovery: local routers.
        RegistrationRefused = "registration_refused",
        RouterRegistered = "router_registered",
        RouterAttached = "router_attached",
        RouterDisconnected = "router_disconnected",
        StackLeft = "stack_left",
        StackWithdrawn = "stack_withdrawn",
        // Discovery: devices and routes.
        DeviceCreated = "device_created",
        DeviceReplaced = "device_replaced",
        DeviceDeleted = "device_deleted",
        DeviceAdopted = "device_adopted",
        ConflictRefused = "conflict_refused",
        RouteAdded = "route_added",
        RouteWithdrawn = "route_withdrawn",
        // Routers.
        StackMacUnchanged = "stack_mac_unchanged",
        AttachFailed = "attach_failed",
        NexthopsUnsupported = "nexthops_unsupported",
        ApplyFailed = "apply_failed",
        MtuCheckOk = "mtu_check_ok",
        MtuCheckFailed = "mtu_check_failed",
        SameHostOk = "same_host_ok",
        SameHostBlocked = "same_host_blocked",
        RouteSkipped = "route_skipped",
        StateUnreadable = "state_unreadable",
        // Routers: access control (issue 14).
        /// A policy went into the kernel (at start, on reload, or a retry that
        /// succeeded after the stack was closed).
        AclInstalled = "acl_installed",
        /// A new policy was refused (a bad rule or file, or the kernel refused it):
        /// the previous policy stays in force.
        AclRefused = "acl_refused",
        /// No policy could be installed: nothing enters the stack from the overlay.
        AclClosed = "acl_closed",
        /// A summary, at most one per rule per 10 s, of the packets a rule dropped and
        /// the source stacks they came from.
        AclDrops = "acl_drops",
        // Discovery: port steering (issue 15).
        /// The steering table went in (or went away): which stacks are steered at
        /// their ports now, and why the others are not.
        SteeringApplied = "steering_applied",
        /// The kernel refused the steering table: the previous one stays, and the
        /// stacks it does not cover keep the policy-rule path.
        SteeringFailed = "steering_failed",
        // Discovery: encryption (issue 16).
        /// The WireGuard device is up: mode, backend, public key, tunnel address.
        EncryptionStarted = "encryption_started",
        /// A peer is not routed because of the encryption settings (this host's or
        /// its): host, both modes and why.
        EncryptionPeerRefused = "encryption_peer_refused",
        /// `prefer`: a peer without a key is routed in the clear (once per peer).
        EncryptionPeerPlain = "encryption_peer_plain",
        /// A routed encrypted peer had no WireGuard handshake for longer than
        /// VROUTER_WG_STALE_SECS (once per episode).
        WgHandshakeStale = "wg_handshake_stale",
        /// `rotate-key`: the next key is announced beside the current one.
        KeyRotationStarted = "key_rotation_started",
        /// The next key became the key (every routed peer uses it, or the wait ran out).
        KeyRotationCompleted = "key_rotation_completed",
        /// Two hosts derive the same tunnel address: the lower underlay address keeps it.
        TunnelAddressCollision = "tunnel_address_collision",
        // Discovery: addresses, paths and relays (issue 17).
        /// The address peers see this host at changed (observed, or none).
        AddressObserved = "address_observed",
        /// The address this host sends to for a peer changed.
        PeerAddressChanged = "peer_address_changed",
        /// Traffic to a peer host now goes through a relay.
        PathRelayed = "path_relayed",
        /// Traffic to a peer host goes directly again.
        PathDirect = "path_direct",
        /// A peer host is reachable neither directly nor through a relay.
        PathUnreachable = "path_unreachable",
        /// A peer (or this host) is behind a port-translating NAT without encryption.
        NatPortTranslated = "nat_port_translated",
        /// A local copy of a stack is outranked by another host's copy (a higher
        /// placement generation): withdrawn here until that copy disappears.
        StackSuperseded = "stack_superseded",
        /// The copy of a stack in use moved to another host (placement generation).
        StackMoved = "stack_moved",
    }
}

wire_enum! {
    /// Where discovery learnt of a peer host (`source` in discovery.json's peers).
    pub enum PeerOrigin {
        /// The static peer configuration (`--config` / `--peers`).
        Static = "static",
        /// The gossip mesh.
        Gossip = "gossip",
    }
}

wire_enum! {
    /// `VROUTER_ENCRYPTION`: whether this host's overlay traffic goes through WireGuard.
    #[derive(Default)]
    pub enum EncryptionMode {
        /// No WireGuard; a peer that requires encryption is not routed.
        #[default]
        Off = "off",
        /// Only through WireGuard: a peer without a key is not routed.
        Require = "require",
        /// Through WireGuard with peers that have a key, in the clear with the others.
        Prefer = "prefer",
    }
}

wire_enum! {
    /// A gossip member's membership state as discovery.json shows it.
    pub enum MemberState {
        Alive = "alive",
        Suspect = "suspect",
        /// Membership failed (no answer to direct or indirect probes).
        Down = "down",
        /// Left the mesh on purpose.
        Left = "left",
        Unknown = "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_unknown_ones_survive() {
        for k in EventKind::ALL {
            assert_eq!(&EventKind::from_wire(k.as_str()), k);
            let json = serde_json::to_string(k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
        let later: EventKind = serde_json::from_str("\"from_the_future\"").unwrap();
        assert_eq!(later, EventKind::Other("from_the_future".into()));
        assert_eq!(
            serde_json::to_string(&later).unwrap(),
            "\"from_the_future\""
        );
        assert!(EventKind::ConflictRefused == "conflict_refused");
        assert_eq!(PeerOrigin::from_wire("gossip"), PeerOrigin::Gossip);
        assert_eq!(MemberState::Down.to_string(), "down");
    }
}
