//! Domain types shared by both binaries: what a VNI, a prefix, a MAC and a stack
//! name are, with parsing that names the bad value and the fix.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Error from parsing a setting; the message names the value and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// A VXLAN network identifier, 1..=16777215.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = 16_777_215;

    pub fn new(value: u32) -> Result<Vni, ParseError> {
        if value == 0 || value > Self::MAX {
            return Err(ParseError(format!(
                "VNI {value} is outside 1..{}; pick a VNI in that range",
                Self::MAX
            )));
        }
        Ok(Vni(value))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// Name of this VNI's VXLAN device in the host namespace.
    pub fn vxlan_ifname(self) -> String {
        format!("vxlan{}", self.0)
    }

    /// Name of a router's overlay link (the macvlan) inside its namespace.
    pub fn overlay_ifname(self) -> String {
        format!("ovl{}", self.0)
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Vni {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u64 = s.trim().parse().map_err(|_| {
            ParseError(format!(
                "VNI {s:?} is not a number; pick a VNI in 1..{}",
                Vni::MAX
            ))
        })?;
        Vni::new(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

impl Serialize for Vni {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for Vni {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        Vni::new(v).map_err(serde::de::Error::custom)
    }
}

/// An IPv4 prefix in canonical form (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: Ipv4Addr,
    len: u8,
}

impl Prefix {
    /// Builds a prefix; host bits must be zero so that one network has one spelling.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Prefix, ParseError> {
        if len > 32 {
            return Err(ParseError(format!(
                "prefix {addr}/{len} has a length over 32; use a CIDR such as 10.1.0.0/24"
            )));
        }
        let p = Prefix { addr, len };
        if p.network() != addr {
            return Err(ParseError(format!(
                "prefix {addr}/{len} has host bits set; did you mean {}/{len}?",
                p.network()
            )));
        }
        Ok(p)
    }

    /// The prefix that contains `addr` at length `len` (host bits cleared).
    pub fn containing(addr: Ipv4Addr, len: u8) -> Prefix {
        let len = len.min(32);
        let p = Prefix { addr, len };
        Prefix {
            addr: p.network(),
            len,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Prefix) -> bool {
        let len = self.len.min(other.len);
        Prefix::containing(self.addr, len) == Prefix::containing(other.addr, len)
    }

    pub fn is_default(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ParseError(format!(
                "{s:?} is not an IPv4 CIDR; write it like 10.1.0.0/24"
            ))
        };
        let (a, l) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        Prefix::new(addr, len)
    }
}

impl Serialize for Prefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const ZERO: Mac = Mac([0; 6]);

    /// A router's MAC: 02, the VNI's low byte, then the router's IPv4 address.
    /// Stable across restarts and derivable by any peer, so configs carry no MACs.
    pub fn for_router(vni: Vni, router_ip: Ipv4Addr) -> Mac {
        let o = router_ip.octets();
        Mac([0x02, (vni.get() & 0xff) as u8, o[0], o[1], o[2], o[3]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError(format!("{s:?} is not a MAC address like 02:e8:0a:01:00:fe"));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A compose stack's name: 1-64 characters of [A-Za-z0-9_.-], not starting with `.`
/// (the stack's probes file, `probes/<name>.json`, would be hidden, and `..` would
/// name a parent directory).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StackName(String);

impl StackName {
    pub fn new(name: &str) -> Result<StackName, ParseError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(ParseError(format!(
                "stack name {name:?} is invalid; use 1-64 characters of letters, digits, '_', '-' or '.', not starting with '.'"
            )));
        }
        Ok(StackName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StackName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StackName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StackName::new(s)
    }
}

impl Serialize for StackName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StackName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StackName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A stack as every host sees it: enough to route to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StackSpec {
    pub name: StackName,
    pub vni: Vni,
    pub prefixes: Vec<Prefix>,
    pub router_ip: Ipv4Addr,
}

impl StackSpec {
    pub fn router_mac(&self) -> Mac {
        Mac::for_router(self.vni, self.router_ip)
    }
}

/// Protocol number stamped on every route and rule this project installs, so a dump
/// can tell ours from everyone else's (iproute2 shows it as "proto 118").
pub const RTPROT_VROUTER: u8 = 118;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_range() {
        assert!(Vni::new(0).is_err());
        assert!(Vni::new(16_777_216).is_err());
        assert_eq!(Vni::new(1000).unwrap().get(), 1000);
        let e = "abc".parse::<Vni>().unwrap_err().0;
        assert!(e.contains("abc") && e.contains("1..16777215"), "{e}");
        assert!("99999999999".parse::<Vni>().is_err());
    }

    #[test]
    fn prefix_parse_and_overlap() {
        let p: Prefix = "10.1.0.0/24".parse().unwrap();
        assert!(p.contains("10.1.0.254".parse().unwrap()));
        assert!(!p.contains("10.1.1.1".parse().unwrap()));
        let e = "10.1.0.5/24".parse::<Prefix>().unwrap_err().0;
        assert!(e.contains("10.1.0.0/24"), "{e}");
        assert!("10.1.0.0".parse::<Prefix>().is_err());
        assert!("10.1.0.0/33".parse::<Prefix>().is_err());
        let q: Prefix = "10.0.0.0/8".parse().unwrap();
        assert!(p.overlaps(&q) && q.overlaps(&p));
        let r: Prefix = "10.2.0.0/24".parse().unwrap();
        assert!(!p.overlaps(&r));
        assert!("0.0.0.0/0".parse::<Prefix>().unwrap().is_default());
    }

    #[test]
    fn router_mac_matches_design_example() {
        let m = Mac::for_router(Vni::new(1000).unwrap(), "10.2.0.254".parse().unwrap());
        assert_eq!(m.to_string(), "02:e8:0a:02:00:fe");
        assert_eq!(m, "02:e8:0a:02:00:fe".parse().unwrap());
    }

    #[test]
    fn stack_names() {
        assert!(StackName::new("web-1.prod_x").is_ok());
        assert!(StackName::new("").is_err());
        assert!(StackName::new("a b").is_err());
        for hidden in [".web", "..", "."] {
            let e = StackName::new(hidden).unwrap_err().to_string();
            assert!(e.contains("not starting with '.'"), "{e}");
        }
        assert!(serde_json::from_str::<StackName>("\".web\"").is_err());
        assert!(StackName::new("web.").is_ok());
    }
}
