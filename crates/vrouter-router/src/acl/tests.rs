use super::*;
use std::net::Ipv4Addr;
use std::path::Path;
use vrouter_state::{Prefix, RemoteRoute, StackName};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

fn stack(s: &str) -> StackName {
    StackName::new(s).unwrap()
}

fn prefix(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn allow(list: &str) -> Policy {
    from_settings(Some("deny"), Some(list), None).unwrap()
}

fn file(text: &str) -> Result<Policy, PolicyError> {
    from_settings(None, None, Some((Path::new("/etc/acl.toml"), text)))
}

fn route(s: &str, p: &str) -> RemoteRoute {
    RemoteRoute {
        prefix: prefix(p),
        stack: stack(s),
        via: ip("10.250.0.1"),
        mac: "02:00:00:00:00:01".parse().unwrap(),
        host: ip("192.168.0.2"),
        same_host: false,
    }
}

fn ports(list: &[(u16, u16)]) -> Vec<PortRange> {
    list.iter()
        .map(|&(first, last)| PortRange { first, last })
        .collect()
}

#[test]
fn the_issue_example_parses() {
    let p = allow("web:tcp/443, ops, 10.9.0.0/16:udp/53, any:icmp");
    assert_eq!(p.default, Verdict::Deny);
    let got: Vec<(&str, Verdict, Source, Service)> = p
        .rules
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.verdict,
                r.source.clone(),
                r.service.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "allow web:tcp/443",
                Verdict::Allow,
                Source::Stack(stack("web")),
                Service::Ports(Protocol::Tcp, ports(&[(443, 443)]))
            ),
            (
                "allow ops",
                Verdict::Allow,
                Source::Stack(stack("ops")),
                Service::All
            ),
            (
                "allow 10.9.0.0/16:udp/53",
                Verdict::Allow,
                Source::Prefix(prefix("10.9.0.0/16")),
                Service::Ports(Protocol::Udp, ports(&[(53, 53)]))
            ),
            (
                "allow any:icmp",
                Verdict::Allow,
                Source::Any,
                Service::Protocol(Protocol::Icmp)
            ),
        ]
    );
}

#[test]
fn ports_are_one_a_range_or_a_list() {
    let p = allow("api:tcp/{443, 80,8000-8080,80}\nlb:UDP/5000-5001,\n, db:tcp");
    assert_eq!(p.rules.len(), 3);
    assert_eq!(
        p.rules[0].service,
        Service::Ports(Protocol::Tcp, ports(&[(80, 80), (443, 443), (8000, 8080)]))
    );
    assert_eq!(p.rules[0].name, "allow api:tcp/{80,443,8000-8080}");
    assert_eq!(
        p.rules[1].service,
        Service::Ports(Protocol::Udp, ports(&[(5000, 5001)]))
    );
    assert_eq!(p.rules[2].service, Service::Protocol(Protocol::Tcp));
    // The text of a rule parses back to the same rule.
    for r in &p.rules {
        assert_eq!(&parse_rule(&r.text(), r.verdict, None).unwrap(), r);
    }
}

#[test]
fn blank_settings_are_todays_behaviour() {
    assert_eq!(from_settings(None, None, None).unwrap(), Policy::default());
    assert_eq!(
        from_settings(Some(" "), Some(""), None).unwrap(),
        Policy::default()
    );
    assert_eq!(Policy::default().default, Verdict::Allow);
    let p = from_settings(Some("DENY"), None, None).unwrap();
    assert_eq!((p.default, p.rules.len()), (Verdict::Deny, 0));
}

/// Every refusal is one line naming the setting, the rule and the fix.
#[test]
fn bad_rules_are_refused_with_the_rule_and_the_fix() {
    let cases: &[(&str, &[&str])] = &[
        (
            "web:tcp/44x",
            &["VROUTER_ALLOW", "\"web:tcp/44x\"", "tcp/443"],
        ),
        ("web:tcp/0", &["\"web:tcp/0\"", "1 to 65535"]),
        ("web:tcp/70000", &["70000", "1 to 65535"]),
        ("web:tcp/90-80", &["backwards", "80-90"]),
        ("web:sctp", &["\"sctp\"", "tcp, udp or icmp"]),
        ("web:icmp/8", &["icmp has no ports", "SOURCE:icmp"]),
        ("10.9.0.1/16", &["host bits", "10.9.0.0/16"]),
        ("10.9.0.1", &["10.9.0.1/32"]),
        ("bad name!", &["\"bad name!\"", "stack name"]),
        (":tcp/80", &["no source"]),
        ("web:tcp/{80,443", &["'}'", "tcp/{80,443}"]),
        ("web:tcp/80}", &["'{'"]),
        ("web:tcp/", &["port \"\""]),
    ];
    for (rule, wanted) in cases {
        let err = from_settings(None, Some(rule), None)
            .expect_err(rule)
            .to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.starts_with("VROUTER_ALLOW: "), "{err}");
        for w in *wanted {
            assert!(err.contains(w), "{rule}: {err:?} lacks {w:?}");
        }
    }
    let err = from_settings(Some("maybe"), None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("VROUTER_DEFAULT_POLICY=\"maybe\""), "{err}");
    assert!(err.contains("set allow"), "{err}");
}

#[test]
fn the_file_has_names_deny_rules_and_a_default() {
    let p = file(
        r#"
default = "deny"

[[rule]]
name = "https from web"
allow = "web:tcp/443"

[[rule]]
deny = "10.9.5.0/24"
"#,
    )
    .unwrap();
    assert_eq!(p.default, Verdict::Deny);
    assert_eq!(p.rules[0].name, "https from web");
    assert_eq!(p.rules[0].verdict, Verdict::Allow);
    assert_eq!(p.rules[1].name, "deny 10.9.5.0/24");
    assert_eq!(p.rules[1].verdict, Verdict::Deny);
    assert_eq!(p.rules[1].source, Source::Prefix(prefix("10.9.5.0/24")));

    // The list's rules come first; an unset default in the file takes the setting's.
    let both = from_settings(
        Some("deny"),
        Some("ops"),
        Some((Path::new("/a"), "[[rule]]\nallow = \"web\"\n")),
    )
    .unwrap();
    let names: Vec<&str> = both.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["allow ops", "allow web"]);
    assert_eq!(both.default, Verdict::Deny);
}

#[test]
fn bad_files_are_refused_with_the_place_and_the_fix() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[[rule]]\nname = \"x\"\nallow = \"web:tcp/44x\"\n",
            &[
                "VROUTER_ACL_FILE /etc/acl.toml",
                "rule 1 (\"x\")",
                "tcp/443",
            ],
        ),
        (
            "[[rule]]\nallow = \"a\"\ndeny = \"b\"\n",
            &["rule 1", "exactly one of allow"],
        ),
        (
            "[[rule]]\nname = \"x\"\n",
            &["rule 1 (\"x\")", "exactly one"],
        ),
        (
            "default = \"open\"\n",
            &["default = \"open\"", "default = \"deny\""],
        ),
        (
            "\n\n[[rule]]\nallow = web\n",
            &["line 4", "docs/operations.md"],
        ),
        (
            "[[rules]]\nallow = \"web\"\n",
            &["rules", "docs/operations.md"],
        ),
        (
            "[[rule]]\nname = \"same\"\nallow = \"a\"\n[[rule]]\nname = \"same\"\ndeny = \"b\"\n",
            &["\"same\" is used twice"],
        ),
        (
            "[[rule]]\nname = \"bad\\\"name\"\nallow = \"a\"\n",
            &["rule 1", "is not usable"],
        ),
    ];
    for (text, wanted) in cases {
        let err = file(text).expect_err(text).to_string();
        assert!(!err.contains('\n'), "{err}");
        for w in *wanted {
            assert!(err.contains(w), "{text}: {err:?} lacks {w:?}");
        }
    }
    let err = from_settings(
        Some("allow"),
        None,
        Some((Path::new("/a"), "default = \"deny\"\n")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("disagree"), "{err}");
    // The same rule twice in the list has the same name.
    let err = from_settings(None, Some("web, web"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"allow web\" is used twice"), "{err}");
}

#[test]
fn stack_names_resolve_to_their_prefixes_and_follow_them() {
    let p = allow("web:tcp/443, 10.9.0.0/16, any:icmp, gone");
    let routes = [route("web", "10.2.0.0/24"), route("db", "10.3.0.0/24")];
    let r = resolve(&p, &routes);
    assert_eq!(r.rules[0].prefixes, vec![prefix("10.2.0.0/24")]);
    assert_eq!(r.rules[1].prefixes, vec![prefix("10.9.0.0/16")]);
    assert_eq!(r.rules[2].prefixes, vec![prefix("0.0.0.0/0")]);
    assert_eq!(r.rules[3].prefixes, vec![]);
    assert_eq!(r.unresolved, vec![stack("gone")]);
    assert_eq!(
        r.decide(ip("10.2.0.5"), TCP, Some(443)).verdict,
        Verdict::Allow
    );

    // web moves (a new prefix, on another host) and gains a second one.
    let moved = [
        RemoteRoute {
            host: ip("192.168.0.9"),
            ..route("web", "10.7.0.0/24")
        },
        route("web", "10.8.0.0/25"),
    ];
    let r = resolve(&p, &moved);
    assert_eq!(
        r.rules[0].prefixes,
        vec![prefix("10.7.0.0/24"), prefix("10.8.0.0/25")]
    );
    assert_eq!(
        r.decide(ip("10.2.0.5"), TCP, Some(443)).verdict,
        Verdict::Deny
    );
    assert_eq!(
        r.decide(ip("10.7.0.5"), TCP, Some(443)).verdict,
        Verdict::Allow
    );
    assert_eq!(
        r.decide(ip("10.8.0.5"), TCP, Some(443)).verdict,
        Verdict::Allow
    );

    // web leaves: its rights go.
    let r = resolve(&p, &[]);
    assert!(r.rules[0].prefixes.is_empty());
    assert_eq!(r.unresolved, vec![stack("gone"), stack("web")]);
    assert_eq!(
        r.decide(ip("10.7.0.5"), TCP, Some(443)).verdict,
        Verdict::Deny
    );
    // Same-host stacks resolve like remote ones.
    let same = [RemoteRoute {
        same_host: true,
        ..route("web", "10.4.0.0/24")
    }];
    assert_eq!(
        resolve(&p, &same)
            .decide(ip("10.4.0.1"), TCP, Some(443))
            .verdict,
        Verdict::Allow
    );
}

#[test]
fn services_cover_their_protocol_and_ports() {
    let r = resolve(&allow("any:tcp/{80,8000-8080}, any:udp/53, any:icmp"), &[]);
    let v = |proto, port| r.decide(ip("10.1.1.1"), proto, port).verdict;
    assert_eq!(v(TCP, Some(80)), Verdict::Allow);
    assert_eq!(v(TCP, Some(8000)), Verdict::Allow);
    assert_eq!(v(TCP, Some(8080)), Verdict::Allow);
    assert_eq!(v(TCP, Some(8081)), Verdict::Deny);
    assert_eq!(v(TCP, Some(53)), Verdict::Deny);
    assert_eq!(v(UDP, Some(53)), Verdict::Allow);
    assert_eq!(v(UDP, Some(80)), Verdict::Deny);
    assert_eq!(v(ICMP, None), Verdict::Allow);
    assert_eq!(v(47, None), Verdict::Deny, "gre");
    assert_eq!(
        v(TCP, None),
        Verdict::Deny,
        "no port: a port rule cannot cover it"
    );
}

/// The documented precedence: longest source prefix, then narrowest service, then
/// deny over allow; the default when no rule covers.
#[test]
fn precedence_is_most_specific_source_then_service_then_deny() {
    let routes = [route("web", "10.2.0.0/24")];
    let decide = |default: &str, file_text: &str, src: &str, proto, port| {
        let p = from_settings(Some(default), None, Some((Path::new("/a"), file_text))).unwrap();
        let r = resolve(&p, &routes);
        let d = r.decide(ip(src), proto, port);
        (d.verdict, d.by.map(|(rule, _)| rule.rule.name.clone()))
    };
    let rules = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(v, t)| format!("[[rule]]\n{v} = \"{t}\"\n"))
            .collect::<String>()
    };
    // A longer prefix beats a shorter one whatever the verdicts.
    let f = rules(&[("deny", "10.9.0.0/16"), ("allow", "10.9.1.0/24:tcp/443")]);
    assert_eq!(
        decide("allow", &f, "10.9.1.7", TCP, Some(443)),
        (Verdict::Allow, Some("allow 10.9.1.0/24:tcp/443".into()))
    );
    assert_eq!(
        decide("allow", &f, "10.9.1.7", TCP, Some(80)),
        (Verdict::Deny, Some("deny 10.9.0.0/16".into()))
    );
    assert_eq!(
        decide("allow", &f, "10.9.2.7", TCP, Some(443)),
        (Verdict::Deny, Some("deny 10.9.0.0/16".into()))
    );
    let f = rules(&[("allow", "any"), ("deny", "10.9.0.0/16")]);
    assert_eq!(decide("deny", &f, "10.9.0.1", ICMP, None).0, Verdict::Deny);
    assert_eq!(decide("deny", &f, "10.8.0.1", ICMP, None).0, Verdict::Allow);
    // A stack counts as its prefix (/24 here): it beats a /16 and loses to a /25.
    let f = rules(&[
        ("deny", "10.2.0.0/16"),
        ("allow", "web"),
        ("deny", "10.2.0.128/25"),
    ]);
    assert_eq!(
        decide("deny", &f, "10.2.0.1", TCP, Some(1)).0,
        Verdict::Allow
    );
    assert_eq!(
        decide("deny", &f, "10.2.0.200", TCP, Some(1)).0,
        Verdict::Deny
    );
    assert_eq!(
        decide("deny", &f, "10.2.1.1", TCP, Some(1)).0,
        Verdict::Deny
    );
    // Same source: the narrower service wins, in either order.
    for f in [
        rules(&[("deny", "web"), ("allow", "web:tcp/443")]),
        rules(&[("allow", "web:tcp/443"), ("deny", "web")]),
    ] {
        assert_eq!(
            decide("allow", &f, "10.2.0.1", TCP, Some(443)).0,
            Verdict::Allow
        );
        assert_eq!(
            decide("allow", &f, "10.2.0.1", TCP, Some(22)).0,
            Verdict::Deny
        );
        assert_eq!(
            decide("allow", &f, "10.2.0.1", UDP, Some(443)).0,
            Verdict::Deny
        );
    }
    // Same source and service: deny beats allow, in either order.
    for f in [
        rules(&[("allow", "web:tcp"), ("deny", "10.2.0.0/24:tcp")]),
        rules(&[("deny", "10.2.0.0/24:tcp"), ("allow", "web:tcp")]),
    ] {
        assert_eq!(
            decide("allow", &f, "10.2.0.1", TCP, Some(80)),
            (Verdict::Deny, Some("deny 10.2.0.0/24:tcp".into()))
        );
    }
    // Nothing covers: the default, named as such.
    assert_eq!(
        decide("deny", "", "10.2.0.1", TCP, Some(80)),
        (Verdict::Deny, None)
    );
    assert_eq!(
        decide("allow", "", "10.2.0.1", TCP, Some(80)),
        (Verdict::Allow, None)
    );
}

#[test]
fn a_decision_explains_itself() {
    let p = allow("web:tcp/443");
    let r = resolve(&p, &[route("web", "10.2.0.0/24")]);
    assert_eq!(
        r.decide(ip("10.2.0.9"), TCP, Some(443)).to_string(),
        "allow by rule \"allow web:tcp/443\": the source is in 10.2.0.0/24 (stack web), the most specific rule that covers it"
    );
    assert_eq!(
        r.decide(ip("10.2.0.9"), TCP, Some(80)).to_string(),
        "deny by default: no rule covers it"
    );
}
