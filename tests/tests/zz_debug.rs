use std::time::Duration;
use vrouter_tests::encryption::*;
#[test]
fn debug_hold() {
    let g = gossip_mesh_with_modes("enc_debug", &["require"; 2]).unwrap();
    g.wait_all_routes(Duration::from_secs(30)).unwrap();
    std::fs::write("/tmp/wgc-debug-ready", "1").unwrap();
    let secs: u64 = std::env::var("HOLD").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    for _ in 0..secs { if std::path::Path::new("/tmp/wgc-debug-stop").exists() { break; } std::thread::sleep(Duration::from_secs(1)); }
}
