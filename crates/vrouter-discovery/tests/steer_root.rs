//! Root test: the table `steer::plan` decides goes into the kernel as it is, its
//! counters are read back by comment and carried across a replacement, and a table
//! whose devices are gone is deleted. Runs in a throwaway network namespace.

use std::net::Ipv4Addr;
use vrouter_discovery::steer::{self, Bridge, Facts, Overlay, Port, StackFacts};
use vrouter_discovery::steering;
use vrouter_kernel::{BridgeFdbEntry, Kernel};
use vrouter_state::{Mac, Prefix, RemoteRoute, StackName, StackSpec, SteeringMode, Vni};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("root test skipped under CI");
    }
    eprintln!("skipping: needs root for network namespaces");
    false
}

fn spec(name: &str, third: u8) -> StackSpec {
    StackSpec {
        name: StackName::new(name).unwrap(),
        vni: Vni::new(1000).unwrap(),
        prefixes: vec![Prefix::new(Ipv4Addr::new(10, third, 0, 0), 24).unwrap()],
        router_ip: Ipv4Addr::new(10, third, 0, 254),
    }
}

async fn veth(handle: &rtnetlink::Handle, k: &Kernel, name: &str) -> u32 {
    handle
        .link()
        .add(rtnetlink::LinkVeth::new(name, &format!("{name}p")).build())
        .execute()
        .await
        .expect("create veth");
    let index = k.link_by_name(name).await.unwrap().unwrap().index;
    k.set_up(index).await.unwrap();
    index
}

#[test]
fn planned_table_goes_in_and_keeps_its_counters() {
    if !root() {
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
    })
    .join()
    .unwrap();
}

async fn body() {
    let k = Kernel::connect().await.unwrap();
    let (connection, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(connection);
    // A stand-in for vxlan1000 (any device can be a fwd target), the router's port
    // and two service ports.
    let overlay = veth(&handle, &k, "ovl0").await;
    let router = veth(&handle, &k, "vrp0").await;
    let svc1 = veth(&handle, &k, "vsp1").await;
    let svc2 = veth(&handle, &k, "vsp2").await;
    let a = spec("a", 1);
    let b = spec("b", 2);
    let learned = |mac: Mac, port: u32| BridgeFdbEntry {
        mac,
        port,
        learned: true,
    };
    let stack = StackFacts {
        spec: a.clone(),
        conntrack: false,
        bridge: Some(Bridge {
            name: "br-a".into(),
            index: 100,
            ports: vec![
                Port {
                    index: router,
                    name: "vrp0".into(),
                },
                Port {
                    index: svc1,
                    name: "vsp1".into(),
                },
                Port {
                    index: svc2,
                    name: "vsp2".into(),
                },
            ],
            fdb: vec![
                learned(steer::stack_mac(a.router_ip), router),
                learned(Mac([2, 0x42, 10, 1, 0, 5]), svc1),
                learned(Mac([2, 0x42, 10, 1, 0, 6]), svc2),
            ],
        }),
        overlay: Some(Overlay {
            index: overlay,
            mtu: 1450,
        }),
        routes: vec![RemoteRoute {
            prefix: b.prefixes[0],
            stack: b.name.clone(),
            via: b.router_ip,
            mac: b.router_mac(),
            host: Ipv4Addr::new(198, 18, 0, 2),
            same_host: false,
        }],
    };
    let mut facts = Facts {
        table: "vd2steer".into(),
        stacks: vec![stack],
        counters: Default::default(),
    };
    let plan = steer::plan(&facts);
    assert_eq!(plan.stacks[&a.name].mode, SteeringMode::Ports);
    let table = plan.table.expect("a table");
    steering::replace(&table).expect("the kernel takes the planned table");

    let listed = std::process::Command::new("nft")
        .args(["list", "table", "netdev", "vd2steer"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Ok(listed) = listed {
        for want in [
            "chain p_",
            "hook ingress device \"vsp1\"",
            "hook ingress device \"vrp0\"",
            "comment \"steer a b\"",
            "comment \"port vsp2 a\"",
            "fwd to ether daddr map @macs_0a0100fe",
        ] {
            assert!(listed.contains(want), "{want} missing from\n{listed}");
        }
    }

    let counters = steering::read_counters("vd2steer").unwrap();
    assert_eq!(
        counters,
        steer::comments(&table)
            .into_iter()
            .map(|c| (c, (0, 0)))
            .collect()
    );

    // Replaced with carried counters: the kernel starts from them.
    facts.counters = [
        ("steer a b".to_string(), (5, 500)),
        ("port vsp1 a".into(), (7, 700)),
    ]
    .into_iter()
    .collect();
    let carried = steer::plan(&facts).table.unwrap();
    assert!(steer::same_layout(&table, &carried));
    steering::replace(&carried).unwrap();
    let counters = steering::read_counters("vd2steer").unwrap();
    assert_eq!(counters["steer a b"], (5, 500));
    assert_eq!(counters["port vsp1 a"], (7, 700));
    assert_eq!(counters["deliver a"], (0, 0));

    // A service port goes away: the table with it is deleted without complaint.
    k.delete_link(svc2).await.unwrap();
    steering::delete("vd2steer").expect("delete with a device gone");
    assert!(steering::read_counters("vd2steer").unwrap().is_empty());
    steering::delete("vd2steer").expect("deleting a missing table is Ok");
}
