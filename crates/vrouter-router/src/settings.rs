//! The router's settings, read from the environment. Parsing is pure (a lookup
//! function in, a value or one operator-readable line out) so it is tested without
//! root; the defaults that depend on the namespace's interfaces are resolved by
//! [`resolve_router_ip`] and [`connected_prefixes`] from plain kernel dumps.

use crate::acl::{self, Policy, PolicyError};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vrouter_kernel::{Address, Link};
use vrouter_state::{Prefix, StackName, Vni};

pub const DEFAULT_VNI: u32 = 1000;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/docker-router";
pub const DEFAULT_RECONCILE_INTERVAL_MS: u64 = 2000;

/// Shortest reconcile interval accepted: below it the router would spend its time
/// dumping the kernel.
const MIN_RECONCILE_INTERVAL_MS: u64 = 100;

/// Text of `vrouter-router --help`.
pub const HELP: &str = "\
vrouter-router: the data plane of one compose stack (docker-vrouter)

USAGE:
    vrouter-router            run the router (in the stack's network namespace)
    vrouter-router leave      withdraw this stack from the mesh now, then exit
    vrouter-router healthcheck
                              exit 0 if the overlay link is up and the kernel's
                              routes match routes.json, else print why and exit 1
                              (the image's HEALTHCHECK; `health` is an alias)
    vrouter-router status [--json]
                              this stack's overlay link, routes, and each remote
                              router's reachability, RTT, loss, MTU check and
                              traffic, and the access rules' counters (from
                              probes/<stack>.json)
    vrouter-router status --explain SRC [PROTO[/PORT]]
                              which access rule decides a new connection from
                              SRC (e.g. 10.2.0.5 tcp/443), and why
    vrouter-router --version  print the version
    vrouter-router --help     print this text

SETTINGS (environment):
    VROUTER_STACK                  stack name (required), e.g. shop
    VROUTER_VNI                    VXLAN network id, 1..16777215 (default 1000)
    VROUTER_PREFIXES               comma-separated CIDRs this stack owns, e.g.
                                   10.1.0.0/24,10.1.1.0/24 (default: the connected
                                   subnets of the router's interfaces, except lo
                                   and ovl*)
    VROUTER_STATE_DIR              shared state directory (default /var/lib/docker-router)
    VROUTER_ROUTER_IP              the router's IPv4 address on the stack network
                                   (default: the address of the interface holding
                                   the default route, else of the only interface)
    VROUTER_RECONCILE_INTERVAL_MS  how often the kernel is checked for drift
                                   (default 2000)
    VROUTER_ALLOW_EXTRA_CAPS       1/true to run with a bounding set wider than
                                   CAP_NET_ADMIN (the all-in-one image sets it)
    VROUTER_DEFAULT_POLICY         allow (default) or deny: new connections from
                                   the overlay that no rule covers
    VROUTER_ALLOW                  who may enter, e.g. web:tcp/443, ops,
                                   10.9.0.0/16:udp/53, any:icmp
    VROUTER_ACL_FILE               the same rules in TOML, with names and deny
                                   rules; reloaded on change and SIGHUP
    RUST_LOG                       log filter (default info)

The container needs cap_drop: [ALL], cap_add: [NET_ADMIN], and the sysctls
net.ipv4.ip_forward=1 and net.ipv4.conf.{all,default}.rp_filter=0 (2 works too, at
the cost of a route lookup per packet; 1 drops traffic). At start the
router sets its stack interface's MAC to 02:42 followed by its IPv4 address, so the
host and the services find it again at once after a restart.
";

/// A setting had a bad value; the message is one line naming the setting, the value
/// and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub stack: StackName,
    pub vni: Vni,
    /// None: derive from the connected subnets at start.
    pub prefixes: Option<Vec<Prefix>>,
    pub state_dir: PathBuf,
    /// None: derive from the interfaces at start.
    pub router_ip: Option<Ipv4Addr>,
    pub reconcile_interval: Duration,
    pub allow_extra_caps: bool,
    /// Who may enter the stack from the overlay (issue 14).
    pub acl: AclSettings,
}

/// The access-control settings as given; [`AclSettings::policy`] reads the file and
/// makes the policy. The list and the default are checked when the settings are
/// parsed, so a bad one stops the router at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclSettings {
    /// `VROUTER_DEFAULT_POLICY`.
    pub default: Option<String>,
    /// `VROUTER_ALLOW`.
    pub allow: Option<String>,
    /// `VROUTER_ACL_FILE`.
    pub file: Option<PathBuf>,
}

/// Largest policy file read (a 1,000-rule file is about 50 KiB).
pub const MAX_ACL_FILE_BYTES: u64 = 4 << 20;

impl AclSettings {
    /// The policy: the settings with the file's contents as they are now. Err is one
    /// line naming the setting, the rule and the fix.
    pub fn policy(&self) -> Result<Policy, PolicyError> {
        let text = self.file.as_deref().map(read_acl_file).transpose()?;
        self.policy_with(text.as_deref())
    }

    /// The policy with `text` as the file's contents (pure).
    pub fn policy_with(&self, text: Option<&str>) -> Result<Policy, PolicyError> {
        acl::from_settings(
            self.default.as_deref(),
            self.allow.as_deref(),
            self.file.as_deref().zip(text),
        )
    }
}

fn read_acl_file(path: &Path) -> Result<String, PolicyError> {
    use std::io::Read;
    let fail = |e: &dyn std::fmt::Display| {
        PolicyError(format!(
            "VROUTER_ACL_FILE {}: cannot read it ({e}); mount the file into the router container, or unset VROUTER_ACL_FILE",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let mut text = String::new();
    file.take(MAX_ACL_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(&e))?;
    if text.len() as u64 > MAX_ACL_FILE_BYTES {
        return Err(PolicyError(format!(
            "VROUTER_ACL_FILE {}: larger than {} MiB; a policy of thousands of rules is far smaller, so check that this is the policy file",
            path.display(),
            MAX_ACL_FILE_BYTES >> 20
        )));
    }
    Ok(text)
}

impl Settings {
    pub fn from_env() -> Result<Settings, SettingsError> {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// Parses settings from any lookup (the environment, or a map in tests). Empty
    /// values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());

        let stack = match get("VROUTER_STACK") {
            None => {
                return Err(SettingsError(
                    "VROUTER_STACK is not set; set it to the compose stack's name, e.g. VROUTER_STACK=shop"
                        .to_string(),
                ))
            }
            Some(v) => StackName::new(v.trim()).map_err(|e| bad("VROUTER_STACK", &v, &e.0))?,
        };
        let vni = match get("VROUTER_VNI") {
            None => Vni::new(DEFAULT_VNI).expect("default VNI is valid"),
            Some(v) => v.parse::<Vni>().map_err(|e| bad("VROUTER_VNI", &v, &e.0))?,
        };
        let prefixes = get("VROUTER_PREFIXES")
            .map(|v| parse_prefixes(&v))
            .transpose()?;
        let state_dir = get("VROUTER_STATE_DIR")
            .map(|v| PathBuf::from(v.trim()))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(bad(
                "VROUTER_STATE_DIR",
                &state_dir.display().to_string(),
                "use an absolute path such as /var/lib/docker-router",
            ));
        }
        let router_ip = get("VROUTER_ROUTER_IP")
            .map(|v| {
                let ip: Ipv4Addr = v.trim().parse().map_err(|_| {
                    bad(
                        "VROUTER_ROUTER_IP",
                        &v,
                        "write an IPv4 address such as 10.1.0.254",
                    )
                })?;
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast()
                {
                    return Err(bad(
                        "VROUTER_ROUTER_IP",
                        &v,
                        "use the router's unicast address on the stack network",
                    ));
                }
                Ok(ip)
            })
            .transpose()?;
        let reconcile_interval = match get("VROUTER_RECONCILE_INTERVAL_MS") {
            None => Duration::from_millis(DEFAULT_RECONCILE_INTERVAL_MS),
            Some(v) => match v.trim().parse::<u64>() {
                Ok(ms) if ms >= MIN_RECONCILE_INTERVAL_MS => Duration::from_millis(ms),
                _ => {
                    return Err(bad(
                        "VROUTER_RECONCILE_INTERVAL_MS",
                        &v,
                        &format!(
                            "use a number of milliseconds, at least {MIN_RECONCILE_INTERVAL_MS} (default {DEFAULT_RECONCILE_INTERVAL_MS})"
                        ),
                    ))
                }
            },
        };
        let allow_extra_caps = match get("VROUTER_ALLOW_EXTRA_CAPS") {
            None => false,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => {
                    return Err(bad(
                        "VROUTER_ALLOW_EXTRA_CAPS",
                        &v,
                        "use 1/true to allow capabilities beyond NET_ADMIN, or 0/false",
                    ))
                }
            },
        };
        let acl = AclSettings {
            default: get("VROUTER_DEFAULT_POLICY"),
            allow: get("VROUTER_ALLOW"),
            file: get("VROUTER_ACL_FILE").map(|v| PathBuf::from(v.trim())),
        };
        // The list and the default now; the file when the router starts (and on
        // every reload), since it may change.
        acl.policy_with(None).map_err(|e| SettingsError(e.0))?;
        Ok(Settings {
            stack,
            vni,
            prefixes,
            state_dir,
            router_ip,
            reconcile_interval,
            allow_extra_caps,
            acl,
        })
    }

    pub fn overlay_ifname(&self) -> String {
        self.vni.overlay_ifname()
    }
}

fn bad(name: &str, value: &str, fix: &str) -> SettingsError {
    SettingsError(format!("{name}={value:?} is invalid: {fix}"))
}

fn parse_prefixes(value: &str) -> Result<Vec<Prefix>, SettingsError> {
    let mut out: Vec<Prefix> = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: Prefix = part
            .parse()
            .map_err(|e: vrouter_state::ParseError| bad("VROUTER_PREFIXES", value, &e.0))?;
        if p.is_default() {
            return Err(bad(
                "VROUTER_PREFIXES",
                value,
                "0.0.0.0/0 would claim every address; list the stack's subnets",
            ));
        }
        if let Some(q) = out.iter().find(|q| q.overlaps(&p)) {
            return Err(bad(
                "VROUTER_PREFIXES",
                value,
                &format!("{q} and {p} overlap; list each subnet once"),
            ));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(bad(
            "VROUTER_PREFIXES",
            value,
            "list at least one CIDR such as 10.1.0.0/24, or unset it to use the connected subnets",
        ));
    }
    Ok(out)
}

/// Interfaces whose subnets are never the stack's: loopback and our own overlay.
fn is_stack_interface(link: &Link) -> bool {
    link.name != "lo" && !link.name.starts_with("ovl")
}

/// The stack's prefixes by default: the connected subnets of the router's interfaces
/// other than lo and ovl*, in a stable order, without duplicates.
pub fn connected_prefixes(links: &[Link], addrs: &[Address]) -> Vec<Prefix> {
    let mut out: Vec<Prefix> = addrs
        .iter()
        .filter(|a| {
            links
                .iter()
                .any(|l| l.index == a.index && is_stack_interface(l))
        })
        .filter(|a| a.prefix_len > 0 && a.prefix_len < 32 && !a.addr.is_loopback())
        .map(|a| Prefix::containing(a.addr, a.prefix_len))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where the router sits on the stack network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackAttachment {
    pub router_ip: Ipv4Addr,
    /// Index of the interface holding `router_ip` (the stack network's).
    pub index: u32,
}

/// Picks the router's address: the configured one (which must be local), else the
/// address of the interface holding the default route, else that of the single
/// non-lo interface. `default_oif` is the default route's output interface.
pub fn resolve_router_ip(
    configured: Option<Ipv4Addr>,
    links: &[Link],
    addrs: &[Address],
    default_oif: Option<u32>,
) -> Result<StackAttachment, SettingsError> {
    let candidates: Vec<&Address> = addrs
        .iter()
        .filter(|a| {
            links
                .iter()
                .any(|l| l.index == a.index && is_stack_interface(l))
        })
        .filter(|a| !a.addr.is_loopback())
        .collect();
    if let Some(ip) = configured {
        return candidates
            .iter()
            .find(|a| a.addr == ip)
            .map(|a| StackAttachment {
                router_ip: ip,
                index: a.index,
            })
            .ok_or_else(|| {
                bad(
                    "VROUTER_ROUTER_IP",
                    &ip.to_string(),
                    &format!(
                        "no interface of the router has this address (it has {}); give the router this fixed IP on the stack network (ipv4_address) or fix the setting",
                        list_addrs(&candidates)
                    ),
                )
            });
    }
    let pick = |on: Vec<&&Address>, why: &str| -> Result<StackAttachment, SettingsError> {
        match on.as_slice() {
            [one] => Ok(StackAttachment {
                router_ip: one.addr,
                index: one.index,
            }),
            [] => Err(SettingsError(format!(
                "VROUTER_ROUTER_IP is not set and {why} has no IPv4 address; set VROUTER_ROUTER_IP to the router's address on the stack network"
            ))),
            many => Err(SettingsError(format!(
                "VROUTER_ROUTER_IP is not set and {why} has several IPv4 addresses ({}); set VROUTER_ROUTER_IP to the one on the stack network",
                list_addrs(&many.iter().map(|a| **a).collect::<Vec<_>>())
            ))),
        }
    };
    if let Some(oif) = default_oif {
        let on: Vec<&&Address> = candidates.iter().filter(|a| a.index == oif).collect();
        if !on.is_empty() {
            return pick(on, "the default route's interface");
        }
    }
    let mut indexes: Vec<u32> = candidates.iter().map(|a| a.index).collect();
    indexes.sort();
    indexes.dedup();
    match indexes.as_slice() {
        [_] => pick(candidates.iter().collect(), "the router's only interface"),
        [] => Err(SettingsError(
            "VROUTER_ROUTER_IP is not set and the router has no IPv4 address outside lo; attach the router to the stack network with a fixed ipv4_address".to_string(),
        )),
        _ => Err(SettingsError(format!(
            "VROUTER_ROUTER_IP is not set, there is no default route, and the router has addresses on several interfaces ({}); set VROUTER_ROUTER_IP to the one on the stack network",
            list_addrs(&candidates)
        ))),
    }
}

fn list_addrs(addrs: &[&Address]) -> String {
    if addrs.is_empty() {
        return "none".to_string();
    }
    addrs
        .iter()
        .map(|a| format!("{}/{}", a.addr, a.prefix_len))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    fn err(vars: &[(&str, &str)]) -> String {
        let e = parse(vars).unwrap_err().0;
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn defaults() {
        let s = parse(&[("VROUTER_STACK", "shop")]).unwrap();
        assert_eq!(s.stack.as_str(), "shop");
        assert_eq!(s.vni.get(), 1000);
        assert_eq!(s.prefixes, None);
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/docker-router"));
        assert_eq!(s.router_ip, None);
        assert_eq!(s.reconcile_interval, Duration::from_millis(2000));
        assert!(!s.allow_extra_caps);
        assert_eq!(s.overlay_ifname(), "ovl1000");
    }

    #[test]
    fn all_set() {
        let s = parse(&[
            ("VROUTER_STACK", "a"),
            ("VROUTER_VNI", "42"),
            ("VROUTER_PREFIXES", "10.1.0.0/24, 10.1.1.0/24"),
            ("VROUTER_STATE_DIR", "/srv/state"),
            ("VROUTER_ROUTER_IP", "10.1.0.254"),
            ("VROUTER_RECONCILE_INTERVAL_MS", "500"),
            ("VROUTER_ALLOW_EXTRA_CAPS", "true"),
        ])
        .unwrap();
        assert_eq!(s.vni.get(), 42);
        assert_eq!(
            s.prefixes.unwrap(),
            vec![
                "10.1.0.0/24".parse().unwrap(),
                "10.1.1.0/24".parse().unwrap()
            ]
        );
        assert_eq!(s.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(s.router_ip, Some(Ipv4Addr::new(10, 1, 0, 254)));
        assert_eq!(s.reconcile_interval, Duration::from_millis(500));
        assert!(s.allow_extra_caps);
    }

    #[test]
    fn stack_is_required_and_checked() {
        let e = err(&[]);
        assert!(e.contains("VROUTER_STACK") && e.contains("set it"), "{e}");
        let e = err(&[("VROUTER_STACK", "a b")]);
        assert!(
            e.contains("VROUTER_STACK=\"a b\"") && e.contains("letters"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_setting_value_and_fix() {
        let cases: &[(&str, &str, &str)] = &[
            ("VROUTER_VNI", "0", "1..16777215"),
            ("VROUTER_VNI", "x", "1..16777215"),
            (
                "VROUTER_PREFIXES",
                "10.1.0.5/24",
                "did you mean 10.1.0.0/24",
            ),
            ("VROUTER_PREFIXES", "10.1.0.0", "10.1.0.0/24"),
            ("VROUTER_PREFIXES", "0.0.0.0/0", "list the stack's subnets"),
            ("VROUTER_PREFIXES", "10.0.0.0/8,10.1.0.0/24", "overlap"),
            ("VROUTER_PREFIXES", ",", "at least one CIDR"),
            ("VROUTER_STATE_DIR", "state", "absolute path"),
            ("VROUTER_ROUTER_IP", "10.1.0", "IPv4 address"),
            ("VROUTER_ROUTER_IP", "127.0.0.1", "unicast"),
            ("VROUTER_RECONCILE_INTERVAL_MS", "10", "at least 100"),
            ("VROUTER_RECONCILE_INTERVAL_MS", "soon", "milliseconds"),
            ("VROUTER_ALLOW_EXTRA_CAPS", "maybe", "1/true"),
        ];
        for (name, value, fix) in cases {
            let e = err(&[("VROUTER_STACK", "a"), (name, value)]);
            assert!(e.starts_with(&format!("{name}={value:?}")), "{e}");
            assert!(e.contains(fix), "{name}: {e}");
        }
    }

    #[test]
    fn acl_settings_are_checked_at_parse_and_the_file_at_load() {
        let s = parse(&[("VROUTER_STACK", "a")]).unwrap();
        assert_eq!(s.acl, AclSettings::default());
        assert_eq!(s.acl.policy().unwrap(), Policy::default());

        let s = parse(&[
            ("VROUTER_STACK", "a"),
            ("VROUTER_DEFAULT_POLICY", "deny"),
            ("VROUTER_ALLOW", "web:tcp/443, any:icmp"),
        ])
        .unwrap();
        let p = s.acl.policy().unwrap();
        assert_eq!(p.default, acl::Verdict::Deny);
        assert_eq!(p.rules.len(), 2);

        // A bad list or default is a settings error: one line, names the setting.
        let e = err(&[("VROUTER_STACK", "a"), ("VROUTER_ALLOW", "web:tcp/0")]);
        assert!(e.starts_with("VROUTER_ALLOW: rule \"web:tcp/0\""), "{e}");
        let e = err(&[("VROUTER_STACK", "a"), ("VROUTER_DEFAULT_POLICY", "open")]);
        assert!(e.starts_with("VROUTER_DEFAULT_POLICY=\"open\""), "{e}");

        // The file: read when the policy is made; missing or bad, one line.
        let dir = std::env::temp_dir().join(format!("vrouter-acl-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acl.toml");
        let path_s = path.to_str().unwrap().to_string();
        let s = parse(&[
            ("VROUTER_STACK", "a"),
            ("VROUTER_DEFAULT_POLICY", "deny"),
            ("VROUTER_ALLOW", "any:icmp"),
            ("VROUTER_ACL_FILE", &path_s),
        ])
        .unwrap();
        assert_eq!(s.acl.file.as_deref(), Some(path.as_path()));
        let e = s.acl.policy().unwrap_err().0;
        assert!(
            e.starts_with(&format!("VROUTER_ACL_FILE {path_s}: cannot read it"))
                && e.contains("mount the file")
                && !e.contains('\n'),
            "{e}"
        );
        std::fs::write(
            &path,
            "[[rule]]\nname = \"db\"\ndeny = \"10.9.0.0/16:tcp/5432\"\n",
        )
        .unwrap();
        let p = s.acl.policy().unwrap();
        let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["allow any:icmp", "db"]);
        std::fs::write(&path, "[[rule]]\nallow = \"web:tcp/99999\"\n").unwrap();
        let e = s.acl.policy().unwrap_err().0;
        assert!(e.contains("VROUTER_ACL_FILE") && e.contains("99999"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_value_means_default() {
        let s = parse(&[("VROUTER_STACK", "a"), ("VROUTER_VNI", "")]).unwrap();
        assert_eq!(s.vni.get(), 1000);
    }

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.to_string(),
            kind: None,
            mac: None,
            mtu: 1500,
            up: true,
            parent: None,
            vxlan: None,
            alias: None,
        }
    }

    fn addr(index: u32, a: &str, len: u8) -> Address {
        Address {
            index,
            addr: a.parse().unwrap(),
            prefix_len: len,
        }
    }

    #[test]
    fn connected_prefixes_skip_lo_and_overlay() {
        let links = [
            link(1, "lo"),
            link(2, "eth0"),
            link(3, "ovl1000"),
            link(4, "eth1"),
        ];
        let addrs = [
            addr(1, "127.0.0.1", 8),
            addr(2, "10.1.0.254", 24),
            addr(3, "10.1.0.254", 24),
            addr(4, "10.1.1.254", 24),
            addr(4, "10.1.1.253", 24),
        ];
        let p = connected_prefixes(&links, &addrs);
        assert_eq!(
            p,
            vec![
                "10.1.0.0/24".parse().unwrap(),
                "10.1.1.0/24".parse().unwrap()
            ]
        );
    }

    #[test]
    fn router_ip_from_default_route_or_only_interface() {
        let links = [link(1, "lo"), link(2, "eth0"), link(4, "eth1")];
        let addrs = [
            addr(1, "127.0.0.1", 8),
            addr(2, "10.1.0.254", 24),
            addr(4, "10.9.0.2", 24),
        ];
        let r = resolve_router_ip(None, &links, &addrs, Some(2)).unwrap();
        assert_eq!(r.router_ip, Ipv4Addr::new(10, 1, 0, 254));
        assert_eq!(r.index, 2);
        // No default route, two interfaces: ambiguous.
        let e = resolve_router_ip(None, &links, &addrs, None).unwrap_err().0;
        assert!(
            e.contains("VROUTER_ROUTER_IP") && e.contains("10.9.0.2/24"),
            "{e}"
        );
        // No default route, one interface.
        let r = resolve_router_ip(None, &links[..2], &addrs[..2], None).unwrap();
        assert_eq!(r.router_ip, Ipv4Addr::new(10, 1, 0, 254));
        // Two addresses on the default route's interface: ambiguous.
        let two = [addr(2, "10.1.0.254", 24), addr(2, "10.1.0.253", 24)];
        let e = resolve_router_ip(None, &links, &two, Some(2))
            .unwrap_err()
            .0;
        assert!(
            e.contains("several") && e.contains("VROUTER_ROUTER_IP"),
            "{e}"
        );
    }

    #[test]
    fn configured_router_ip_must_be_local() {
        let links = [link(1, "lo"), link(2, "eth0")];
        let addrs = [addr(2, "10.1.0.254", 24)];
        let ip = Ipv4Addr::new(10, 1, 0, 254);
        assert_eq!(
            resolve_router_ip(Some(ip), &links, &addrs, None)
                .unwrap()
                .index,
            2
        );
        let e = resolve_router_ip(Some(Ipv4Addr::new(10, 1, 0, 9)), &links, &addrs, None)
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("VROUTER_ROUTER_IP=\"10.1.0.9\"") && e.contains("10.1.0.254/24"),
            "{e}"
        );
    }
}
