//! The policy as its owner writes it: a default verdict and rules, parsed from the
//! compact list (`VROUTER_ALLOW`), the TOML file (`VROUTER_ACL_FILE`) and
//! `VROUTER_DEFAULT_POLICY`. Pure: strings in, a [`Policy`] or a one-line error out.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use vrouter_state::{Prefix, StackName};

/// What a rule, or the default, does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a rule is about: the source of a new connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// Every source (0.0.0.0/0).
    Any,
    /// A remote stack: its prefixes as routes.json gives them, whatever host it is on.
    Stack(StackName),
    Prefix(Prefix),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Any => f.write_str("any"),
            Source::Stack(s) => write!(f, "{s}"),
            Source::Prefix(p) => write!(f, "{p}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
        }
    }
}

/// Destination ports `first..=last` (one port when equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// What traffic from the source a rule covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// Every protocol and port.
    All,
    /// One protocol, every port (`tcp`, `udp`, `icmp`).
    Protocol(Protocol),
    /// TCP or UDP to these destination ports (sorted, not empty).
    Ports(Protocol, Vec<PortRange>),
}

impl Service {
    /// How narrow the service is, for precedence: ports 2, a protocol 1, all 0.
    pub fn specificity(&self) -> u8 {
        match self {
            Service::All => 0,
            Service::Protocol(_) => 1,
            Service::Ports(..) => 2,
        }
    }

    /// Whether a new connection of `protocol` (its IP number) to `port` is covered.
    pub fn covers(&self, protocol: u8, port: Option<u16>) -> bool {
        match self {
            Service::All => true,
            Service::Protocol(p) => p.number() == protocol,
            Service::Ports(p, ranges) => {
                p.number() == protocol
                    && port.is_some_and(|port| ranges.iter().any(|r| r.contains(port)))
            }
        }
    }
}

/// One rule: a verdict for new connections from `source` covered by `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique within the policy; the rule's text when the owner gave no name.
    pub name: String,
    pub verdict: Verdict,
    pub source: Source,
    pub service: Service,
}

impl Rule {
    /// The rule in the compact syntax, without its verdict: `web:tcp/{80,443}`.
    pub fn text(&self) -> String {
        match &self.service {
            Service::All => self.source.to_string(),
            Service::Protocol(p) => format!("{}:{}", self.source, p.as_str()),
            Service::Ports(p, ranges) if ranges.len() == 1 => {
                format!("{}:{}/{}", self.source, p.as_str(), ranges[0])
            }
            Service::Ports(p, ranges) => {
                let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                format!("{}:{}/{{{}}}", self.source, p.as_str(), list.join(","))
            }
        }
    }
}

/// Who may enter the stack from the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// For new connections no rule covers.
    pub default: Verdict,
    /// In the order written (order does not decide anything: see [`super`]).
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Whether this is the default policy, "allow, no rules": nothing is restricted,
    /// so the router needs no connection tracking (a stateless table, see
    /// [`super::compile`]) and need not see both directions of its stack's traffic.
    pub fn is_default(&self) -> bool {
        self.default == Verdict::Allow && self.rules.is_empty()
    }
}

impl Default for Policy {
    /// Today's behaviour: everything enters.
    fn default() -> Policy {
        Policy {
            default: Verdict::Allow,
            rules: Vec::new(),
        }
    }
}

/// A policy refused: one line that names the setting, the rule and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// The longest rule name (names go into nftables comments and metric labels).
pub const MAX_NAME_LEN: usize = 64;

/// The policy the settings give: `default` is `VROUTER_DEFAULT_POLICY`, `allow`
/// `VROUTER_ALLOW`, `file` the path and contents of `VROUTER_ACL_FILE`. Unset or blank
/// settings count as absent. Rules of the list come first, then the file's. The
/// default is the file's `default` if it has one, else the setting's, else allow; the
/// two may not disagree.
pub fn from_settings(
    default: Option<&str>,
    allow: Option<&str>,
    file: Option<(&Path, &str)>,
) -> Result<Policy, PolicyError> {
    let blank = |s: &Option<&str>| s.is_none_or(|s| s.trim().is_empty());
    let env_default = match default {
        _ if blank(&default) => None,
        Some(value) => Some(parse_verdict(value).ok_or_else(|| {
            PolicyError(format!(
                "VROUTER_DEFAULT_POLICY={value:?} is neither allow nor deny; set allow (everything enters, the default) or deny (only what the rules allow)"
            ))
        })?),
        None => None,
    };
    let mut rules = Vec::new();
    if let Some(list) = allow.filter(|_| !blank(&allow)) {
        for item in split_list(list).map_err(|e| PolicyError(format!("VROUTER_ALLOW: {e}")))? {
            let rule = parse_rule(&item, Verdict::Allow, None)
                .map_err(|e| PolicyError(format!("VROUTER_ALLOW: rule {item:?}: {e}")))?;
            rules.push(rule);
        }
    }
    let mut file_default = None;
    if let Some((path, text)) = file {
        let parsed = parse_file(text)
            .map_err(|e| PolicyError(format!("VROUTER_ACL_FILE {}: {e}", path.display())))?;
        file_default = parsed.0;
        rules.extend(parsed.1);
    }
    let default = match (env_default, file_default) {
        (Some(a), Some(b)) if a != b => {
            return Err(PolicyError(format!(
                "VROUTER_DEFAULT_POLICY={a} and default = \"{b}\" in VROUTER_ACL_FILE disagree; set the default in one place"
            )))
        }
        (a, b) => b.or(a).unwrap_or(Verdict::Allow),
    };
    let mut names = BTreeSet::new();
    for rule in &rules {
        if !names.insert(rule.name.as_str()) {
            return Err(PolicyError(format!(
                "rule name {:?} is used twice; give each rule its own name (rules without one are named by their text, so drop the repeated rule)",
                rule.name
            )));
        }
    }
    Ok(Policy { default, rules })
}

fn parse_verdict(value: &str) -> Option<Verdict> {
    match value.trim().to_ascii_lowercase().as_str() {
        "allow" => Some(Verdict::Allow),
        "deny" => Some(Verdict::Deny),
        _ => None,
    }
}

/// The items of a compact list: separated by commas or newlines, except inside
/// braces (`tcp/{80,443}`); blank items are skipped.
fn split_list(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut item = String::new();
    let mut depth = 0u32;
    for c in list.chars() {
        match c {
            '{' => {
                depth += 1;
                item.push(c);
            }
            '}' => {
                depth = depth.checked_sub(1).ok_or_else(|| {
                    format!(
                        "a '}}' without its '{{' after {:?}; write ports as tcp/{{80,443}}",
                        item.trim()
                    )
                })?;
                item.push(c);
            }
            ',' | '\n' if depth == 0 => {
                out.push(std::mem::take(&mut item));
            }
            c => item.push(c),
        }
    }
    if depth > 0 {
        return Err(format!(
            "{:?} has a '{{' without its '}}'; write ports as tcp/{{80,443}}",
            item.trim()
        ));
    }
    out.push(item);
    Ok(out
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// One rule in the compact syntax: `SOURCE[:PROTOCOL[/PORTS]]`. The error says what
/// is wrong and how to write it (the caller adds where).
pub fn parse_rule(text: &str, verdict: Verdict, name: Option<&str>) -> Result<Rule, String> {
    let text = text.trim();
    let (source, service) = match text.split_once(':') {
        Some((s, rest)) => (s.trim(), Some(rest.trim())),
        None => (text, None),
    };
    let source = parse_source(source)?;
    let service = match service {
        None => Service::All,
        Some(s) => parse_service(s)?,
    };
    let mut rule = Rule {
        name: String::new(),
        verdict,
        source,
        service,
    };
    rule.name = match name {
        Some(n) => check_name(n)?,
        None => format!("{verdict} {}", rule.text()),
    };
    Ok(rule)
}

fn check_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " _-.:/{},".contains(c));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "name {name:?} is not usable; use 1-{MAX_NAME_LEN} letters, digits, spaces or _-.:/{{}},"
        ))
    }
}

fn parse_source(s: &str) -> Result<Source, String> {
    if s.is_empty() {
        return Err(
            "no source; start with a stack name, a prefix such as 10.9.0.0/16, or any".into(),
        );
    }
    if s == "any" {
        return Ok(Source::Any);
    }
    if s.contains('/') {
        return s.parse().map(Source::Prefix).map_err(|e| e.to_string());
    }
    if s.parse::<Ipv4Addr>().is_ok() {
        return Err(format!(
            "{s} is an address, not a stack name; write {s}/32 for that one address"
        ));
    }
    StackName::new(s)
        .map(Source::Stack)
        .map_err(|e| format!("{e}; or write a prefix such as 10.9.0.0/16, or any"))
}

fn parse_service(s: &str) -> Result<Service, String> {
    let (protocol, ports) = match s.split_once('/') {
        Some((p, ports)) => (p.trim(), Some(ports.trim())),
        None => (s, None),
    };
    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        other => {
            return Err(format!(
                "protocol {other:?} is not tcp, udp or icmp; write web:tcp/443, web:udp/53 or web:icmp, or leave it out for every protocol"
            ))
        }
    };
    let Some(ports) = ports else {
        return Ok(Service::Protocol(protocol));
    };
    if protocol == Protocol::Icmp {
        return Err("icmp has no ports; write SOURCE:icmp".into());
    }
    let list = match ports.strip_prefix('{') {
        Some(inner) => inner
            .strip_suffix('}')
            .ok_or_else(|| format!("ports {ports:?} miss their '}}'; write tcp/{{80,443}}"))?,
        None => ports,
    };
    let mut ranges = Vec::new();
    for part in list.split(',') {
        ranges.push(parse_ports(part.trim())?);
    }
    ranges.sort();
    ranges.dedup();
    Ok(Service::Ports(protocol, ranges))
}

fn parse_ports(s: &str) -> Result<PortRange, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "port {p:?} is not a number from 1 to 65535; write tcp/443, tcp/8000-8080 or tcp/{{80,443}}"
            )),
        }
    };
    let range = match s.split_once('-') {
        Some((a, b)) => PortRange {
            first: port(a)?,
            last: port(b)?,
        },
        None => {
            let p = port(s)?;
            PortRange { first: p, last: p }
        }
    };
    if range.first > range.last {
        return Err(format!(
            "port range {s} runs backwards; write {}-{}",
            range.last, range.first
        ));
    }
    Ok(range)
}

/// The TOML file:
///
/// ```toml
/// default = "deny"            # optional
///
/// [[rule]]
/// name = "https from web"     # optional
/// allow = "web:tcp/443"       # or deny = "...", one rule in the compact syntax
/// ```
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AclFile {
    default: Option<String>,
    #[serde(default)]
    rule: Vec<FileRule>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    name: Option<String>,
    allow: Option<String>,
    deny: Option<String>,
}

fn parse_file(text: &str) -> Result<(Option<Verdict>, Vec<Rule>), String> {
    let file: AclFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        let message = e.message().replace('\n', " ");
        match line {
            Some(line) => format!("line {line}: {message}; see docs/operations.md for the format"),
            None => format!("{message}; see docs/operations.md for the format"),
        }
    })?;
    let default = match &file.default {
        None => None,
        Some(value) => Some(parse_verdict(value).ok_or_else(|| {
            format!("default = {value:?} is neither allow nor deny; write default = \"allow\" or default = \"deny\"")
        })?),
    };
    let mut rules = Vec::new();
    for (i, r) in file.rule.iter().enumerate() {
        let at = match &r.name {
            Some(name) => format!("rule {} ({name:?})", i + 1),
            None => format!("rule {}", i + 1),
        };
        let (verdict, text) = match (&r.allow, &r.deny) {
            (Some(t), None) => (Verdict::Allow, t),
            (None, Some(t)) => (Verdict::Deny, t),
            _ => {
                return Err(format!(
                "{at}: give exactly one of allow = \"SOURCE[:PROTOCOL[/PORTS]]\" or deny = \"...\""
            ))
            }
        };
        let rule = parse_rule(text, verdict, r.name.as_deref())
            .map_err(|e| format!("{at} {verdict} = {text:?}: {e}"))?;
        rules.push(rule);
    }
    Ok((default, rules))
}
