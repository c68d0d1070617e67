//! The attach socket: messages and descriptors both ways, peer death, bad packets,
//! stale socket files.

mod common;

use common::{role, RoleChild, TempDir};
use nix::sys::socket::{self, ControlMessage, MsgFlags, UnixAddr};
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout;
use vrouter_state::attach::{
    AttachListener, AttachSocket, DiscoveryMessage, NetnsKey, Registration, RouterMessage,
    MAX_MESSAGE, SOCKET_MODE,
};
use vrouter_state::{Mac, StackName, StackSpec, Vni, ATTACH_SOCKET};

const T: Duration = Duration::from_secs(5);

/// Entry point of child processes (see common::RoleChild); does nothing in a normal
/// run.
#[test]
fn child_process_entry() {
    let Some((role, dir, _)) = role() else {
        return;
    };
    assert_eq!(role, "attach_client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = AttachSocket::connect(&dir.join(ATTACH_SOCKET))
            .await
            .unwrap();
        sock.send(&RouterMessage::Ack { generation: 7 }, None)
            .await
            .unwrap();
        println!("CONNECTED");
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
}

fn registration() -> RouterMessage {
    RouterMessage::Register(Registration {
        spec: StackSpec {
            name: StackName::new("web").unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec!["10.1.0.0/24".parse().unwrap()],
            router_ip: "10.1.0.254".parse().unwrap(),
        },
        needs_link: true,
        conntrack: true,
    })
}

async fn listen_and_connect(dir: &Path) -> (AttachListener, AttachSocket, AttachSocket) {
    let listener = AttachListener::bind(&dir.join(ATTACH_SOCKET)).unwrap();
    let client = AttachSocket::connect(&dir.join(ATTACH_SOCKET))
        .await
        .unwrap();
    let server = timeout(T, listener.accept()).await.unwrap().unwrap();
    (listener, client, server)
}

fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let (sa, sb) = (
        nix::sys::stat::fstat(a).unwrap(),
        nix::sys::stat::fstat(b).unwrap(),
    );
    (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
}

/// Sends raw bytes and descriptors, bypassing AttachSocket::send's checks.
fn send_raw(sock: &AttachSocket, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    socket::sendmsg::<UnixAddr>(
        sock.as_fd().as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

#[tokio::test]
async fn messages_and_a_namespace_descriptor_travel_both_ways() {
    let tmp = TempDir::new("attach-roundtrip");
    let (_listener, client, server) = listen_and_connect(tmp.path()).await;
    let mode = std::fs::metadata(tmp.path().join(ATTACH_SOCKET))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, SOCKET_MODE);

    let netns = File::open("/proc/self/ns/net").unwrap();
    client
        .send(&registration(), Some(netns.as_fd()))
        .await
        .unwrap();
    let (msg, fd) = timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg, registration());
    let fd = fd.expect("descriptor rode along");
    assert_ne!(fd.as_raw_fd(), netns.as_raw_fd());
    assert!(
        same_file(fd.as_fd(), netns.as_fd()),
        "received fd is the same namespace"
    );
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert!(
        flags & libc::FD_CLOEXEC != 0,
        "received fd is close-on-exec"
    );

    // And back, with a descriptor from the other side.
    let reply = DiscoveryMessage::Attached {
        ifname: "ovl1000".into(),
        mac: Mac::for_router(Vni::new(1000).unwrap(), "10.1.0.254".parse().unwrap()),
        mtu: 1450,
    };
    server.send(&reply, Some(fd.as_fd())).await.unwrap();
    let (got, fd2) = timeout(T, client.recv::<DiscoveryMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, reply);
    assert!(same_file(fd2.unwrap().as_fd(), netns.as_fd()));

    client
        .send(&RouterMessage::Ack { generation: 3 }, None)
        .await
        .unwrap();
    let (msg, fd) = timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg, RouterMessage::Ack { generation: 3 });
    assert!(fd.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_sends_while_another_waits_in_recv() {
    let tmp = TempDir::new("attach-tasks");
    let (_listener, client, server) = listen_and_connect(tmp.path()).await;
    let client = Arc::new(client);
    let waiting = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.recv::<DiscoveryMessage>().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    client.send(&registration(), None).await.unwrap();
    let (msg, _) = timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg, registration());
    server
        .send(&DiscoveryMessage::Registered, None)
        .await
        .unwrap();
    let (got, _) = timeout(T, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, DiscoveryMessage::Registered);
}

#[tokio::test]
async fn closing_the_peer_ends_the_stream() {
    let tmp = TempDir::new("attach-close");
    let (_listener, client, server) = listen_and_connect(tmp.path()).await;
    client
        .send(&RouterMessage::Ack { generation: 1 }, None)
        .await
        .unwrap();
    assert!(!server.peer_closed());
    drop(client);
    assert!(server.peer_closed());
    // What was sent before the close is still delivered, then the end.
    let (msg, _) = timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg, RouterMessage::Ack { generation: 1 });
    assert!(timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .is_none());
    assert!(timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .is_none());
    let err = server
        .send(&DiscoveryMessage::Left, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_process_ends_the_stream_promptly() {
    let tmp = TempDir::new("attach-kill");
    let listener = AttachListener::bind(&tmp.path().join(ATTACH_SOCKET)).unwrap();
    let mut child = RoleChild::spawn("attach_client", tmp.path(), "");
    let server = timeout(Duration::from_secs(30), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (msg, _) = timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg, RouterMessage::Ack { generation: 7 });
    tokio::task::block_in_place(|| child.wait_line("CONNECTED", Duration::from_secs(30)));
    assert!(!server.peer_closed());

    let pending = tokio::spawn(async move {
        let r = server.recv::<RouterMessage>().await;
        (r.map(|m| m.is_none()), Instant::now(), server)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    let killed = Instant::now();
    tokio::task::block_in_place(|| child.sigkill());
    let (closed, at, server) = timeout(Duration::from_secs(1), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(closed.unwrap(), "recv returned Ok(None)");
    assert!(server.peer_closed());
    eprintln!(
        "recv saw the killed peer after {:?} (incl. reaping)",
        at.saturating_duration_since(killed)
    );
}

#[tokio::test]
async fn bad_packets_are_invalid_data_and_the_connection_survives() {
    let tmp = TempDir::new("attach-bad");
    let (listener, client, server) = listen_and_connect(tmp.path()).await;
    let invalid = |r: io::Result<Option<(RouterMessage, _)>>| match r {
        Err(e) if e.kind() == io::ErrorKind::InvalidData => e.to_string(),
        other => panic!(
            "expected InvalidData, got {:?}",
            other.map(|o| o.map(|(m, _)| m))
        ),
    };

    send_raw(&client, b"not json", &[]);
    let e = invalid(timeout(T, server.recv()).await.unwrap());
    assert!(e.contains("malformed"), "{e}");

    send_raw(&client, br#"{"type":"bogus"}"#, &[]);
    invalid(timeout(T, server.recv()).await.unwrap());

    let mut big = br#"{"type":"ack","generation":1,"pad":""#.to_vec();
    big.resize(MAX_MESSAGE + 100, b' ');
    send_raw(&client, &big, &[]);
    let e = invalid(timeout(T, server.recv()).await.unwrap());
    assert!(e.contains("limit"), "{e}");

    let netns = File::open("/proc/self/ns/net").unwrap();
    let ack = serde_json::to_vec(&RouterMessage::Ack { generation: 2 }).unwrap();
    send_raw(&client, &ack, &[netns.as_fd(), netns.as_fd()]);
    let e = invalid(timeout(T, server.recv()).await.unwrap());
    assert!(e.contains("descriptors"), "{e}");

    // The sender refuses an oversized message itself.
    let huge = RouterMessage::Leave {
        stack: StackName::new("web").unwrap(),
    };
    let mut padded = serde_json::to_value(&huge).unwrap();
    padded["pad"] = "x".repeat(MAX_MESSAGE).into();
    let e = client.send(&padded, None).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);

    // The same connection still carries good messages, and the listener still accepts.
    client
        .send(&RouterMessage::Ack { generation: 3 }, None)
        .await
        .unwrap();
    let (msg, _) = timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg, RouterMessage::Ack { generation: 3 });
    let second = AttachSocket::connect(&tmp.path().join(ATTACH_SOCKET))
        .await
        .unwrap();
    let accepted = timeout(T, listener.accept()).await.unwrap().unwrap();
    second
        .send(&RouterMessage::Ack { generation: 4 }, None)
        .await
        .unwrap();
    let (msg, _) = timeout(T, accepted.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg, RouterMessage::Ack { generation: 4 });
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_but_not_a_live_one() {
    let tmp = TempDir::new("attach-stale");
    let path = tmp.path().join(ATTACH_SOCKET);

    // A listener that went away leaves its socket file behind.
    drop(AttachListener::bind(&path).unwrap());
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
    let e = AttachSocket::connect(&path).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    assert!(
        e.to_string().contains("is vrouter-discovery running"),
        "{e}"
    );

    let listener = AttachListener::bind(&path).unwrap();
    let client = AttachSocket::connect(&path).await.unwrap();
    let server = timeout(T, listener.accept()).await.unwrap().unwrap();

    // A live listener is not stolen from.
    let e = AttachListener::bind(&path).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    assert!(e.to_string().contains("only one discovery"), "{e}");
    client
        .send(&RouterMessage::Ack { generation: 1 }, None)
        .await
        .unwrap();
    assert!(timeout(T, server.recv::<RouterMessage>())
        .await
        .unwrap()
        .unwrap()
        .is_some());
    let _again = AttachSocket::connect(&path).await.unwrap();

    // Something that is not a socket is left alone.
    let other = tmp.path().join("not-a-socket");
    std::fs::write(&other, b"keep me").unwrap();
    let e = AttachListener::bind(&other).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&other).unwrap(), b"keep me");
}

#[tokio::test]
async fn pair_connects_two_ends_in_process() {
    let (a, b) = AttachSocket::pair().unwrap();
    a.send(&DiscoveryMessage::Left, None).await.unwrap();
    let (got, _) = timeout(T, b.recv::<DiscoveryMessage>())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, DiscoveryMessage::Left);
}

/// Connects from a fresh network namespace (a helper thread that unshares one);
/// returns the connected descriptor and the namespace's key. None without root.
fn connect_from_new_netns(path: &Path) -> Option<(std::os::fd::OwnedFd, NetnsKey)> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let ns = File::open("/proc/thread-self/ns/net").unwrap();
        let key = NetnsKey::of(ns.as_fd()).unwrap();
        let fd = socket::socket(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        Some((fd, key))
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn peer_netns_names_the_connecting_namespace() {
    let tmp = TempDir::new("attach-peerns");
    let (listener, _client, server) = listen_and_connect(tmp.path()).await;
    let own = NetnsKey::of(File::open("/proc/self/ns/net").unwrap().as_fd()).unwrap();
    let same = match server.peer_netns() {
        Ok(fd) => NetnsKey::of(fd.as_fd()).unwrap(),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            eprintln!("skipped: SIOCGSKNS needs CAP_NET_ADMIN");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(same, own);
    // A regular file is not a namespace.
    let f = File::open("/proc/self/cmdline").unwrap();
    assert_eq!(
        NetnsKey::of(f.as_fd()).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
    let Some((_far_client, far_key)) = connect_from_new_netns(&tmp.path().join(ATTACH_SOCKET))
    else {
        eprintln!("skipped: creating a network namespace needs root");
        return;
    };
    let far = timeout(T, listener.accept()).await.unwrap().unwrap();
    let got = NetnsKey::of(far.peer_netns().unwrap().as_fd()).unwrap();
    assert_eq!(
        got, far_key,
        "the accepted end names the connector's namespace"
    );
    assert_ne!(got, own);
}
