//! Root disks in the `overlay` layout, on real QEMU guests: the image's base is shared
//! read-only by every machine of the image and never written, each machine writes to a
//! layer of its own (`disk_mib` of space, whatever the image's size), and a machine keeps
//! its writes and deletions across stop and start while another machine of the same image
//! sees none of them. And the upgrade: a machine made with a full copy, its record in the
//! version written before layouts existed, starts, stops and is destroyed by the new
//! daemon as before.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hearth::api::pb;
use hearth::client::Client;
use sha2::{Digest, Sha256};
use support::{Daemon, destroy, http_get, wait_for};

/// The workload: reports what it finds of an earlier boot (a mark it writes, a file of
/// the image it deletes) and the size of its root, then serves the report on port 80.
fn reporter(request_id: &str, name: &str, disk_mib: u32) -> pb::CreateMachineRequest {
    let script = format!(
        "mkdir -p /srv/o; \
         if [ -f /srv/mark ]; then m=\"had-$(cat /srv/mark)\"; else m=fresh; fi; \
         if [ -e /srv/www/index.html ]; then w=www-present; else w=www-gone; fi; \
         kb=$(df -k / | awk 'NR==2 {{print $2}}'); \
         echo \"$m $w root-kb=$kb\" > /srv/o/index.html; \
         echo {name} > /srv/mark; rm -f /srv/www/index.html; sync; \
         exec httpd -f -p 80 -h /srv/o"
    );
    let mut request = support::shell_request(request_id, name, &script);
    if let Some(spec) = request.spec.as_mut() {
        spec.disk_mib = disk_mib;
    }
    request
}

/// Creates `request` and waits for it to start; returns the machine and its report.
async fn start_new(
    client: &mut Client,
    request: pb::CreateMachineRequest,
) -> (pb::Machine, String) {
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let started = wait_for(client, &created.id, pb::MachineState::Started).await;
    let page = http_get(&started.guest_ip, 80);
    (started, page)
}

/// Stops and starts machine `id`; returns its report after the start.
async fn restart(client: &mut Client, id: &str) -> String {
    let target = pb::MachineRef { id: id.to_string() };
    client
        .machines
        .stop_machine(target.clone())
        .await
        .expect("stop");
    wait_for(client, id, pb::MachineState::Stopped).await;
    client.machines.start_machine(target).await.expect("start");
    let started = wait_for(client, id, pb::MachineState::Started).await;
    http_get(&started.guest_ip, 80)
}

fn machine_dir(daemon: &Daemon, id: &str) -> PathBuf {
    daemon.layout().machine_dir(id)
}

fn sha256(path: &Path) -> String {
    let mut file = std::fs::File::open(path).expect("open");
    let mut hash = Sha256::new();
    std::io::copy(&mut file, &mut hash).expect("read");
    hex::encode(hash.finalize())
}

/// The root's size the guest reported, in KiB.
fn root_kb(page: &str) -> u64 {
    page.split("root-kb=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no root size in {page:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_share_a_base_nobody_writes_and_keep_their_own_writes() {
    if support::guest_prereqs::guest_prereqs("overlay_disk").is_none() {
        return;
    }
    let daemon = Daemon::start_with("");
    let mut client = daemon.client().await;

    let (a, page) = start_new(&mut client, reporter("ov-a", "alpha", 256)).await;
    assert!(page.contains("fresh www-present"), "{page}");
    // disk_mib sizes the writable layer, which is what the root has to write into.
    let kb = root_kb(&page);
    assert!(
        (200_000..=270_000).contains(&kb),
        "root of {kb} KiB for 256 MiB"
    );

    let dir_a = machine_dir(&daemon, &a.id);
    let base = dir_a.join("base.ext4");
    let meta = std::fs::metadata(&base).expect("the base link");
    assert_eq!(meta.uid(), 0, "the shared base is never handed to a VMM");
    assert_eq!(meta.mode() & 0o777, 0o444);
    let digest = sha256(&base);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", a.vmm_pid)).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("id=base,format=raw,readonly=on,file="),
        "{cmdline}"
    );

    // Its writes and its deletion of an image file survive a stop and a start.
    let page = restart(&mut client, &a.id).await;
    assert!(page.contains("had-alpha www-gone"), "{page}");

    // Another machine of the image sees none of them, and shares the same base inode.
    let (b, page) = start_new(&mut client, reporter("ov-b", "beta", 0)).await;
    assert!(page.contains("fresh www-present"), "{page}");
    assert!(root_kb(&page) > 900_000, "default layer: {page}");
    let base_b = std::fs::metadata(machine_dir(&daemon, &b.id).join("base.ext4")).expect("b");
    assert_eq!((base_b.dev(), base_b.ino()), (meta.dev(), meta.ino()));
    assert!(
        base_b.nlink() >= 3,
        "the cache's file and two machines' links"
    );

    destroy(&mut client, &a.id).await;
    destroy(&mut client, &b.id).await;
    // The base is as it was: both guests wrote only to their own layers.
    let bases: Vec<PathBuf> = std::fs::read_dir(daemon.dir.path().join("data/images/bases"))
        .expect("bases")
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == meta.ino()))
        .collect();
    assert_eq!(bases.len(), 1, "the base is still in the cache");
    assert_eq!(sha256(&bases[0]), digest);
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

/// Rewrites machine `id`'s stored record as the daemon wrote it before disk layouts: the
/// V5 envelope (variant 4) back to V4 (variant 3) without its last field, the layout
/// (`copy`, one byte).
fn downgrade_record(store: &Path, id: &str) {
    use redb::ReadableTable;
    const MACHINES: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("machines");
    let db = redb::Database::open(store).expect("open the store");
    let write = db.begin_write().expect("write");
    {
        let mut table = write.open_table(MACHINES).expect("machines");
        let bytes = table
            .get(id)
            .expect("read")
            .expect("the record")
            .value()
            .to_vec();
        assert_eq!(bytes.first(), Some(&4), "a V5 record");
        assert_eq!(bytes.last(), Some(&1), "its layout is copy");
        let mut old = bytes[..bytes.len() - 1].to_vec();
        old[0] = 3;
        table.insert(id, old.as_slice()).expect("write");
    }
    write.commit().expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_copy_machine_from_before_the_upgrade_starts_stops_and_goes() {
    if support::guest_prereqs::guest_prereqs("overlay_disk (upgrade)").is_none() {
        return;
    }
    let mut daemon = Daemon::start_with("[images]\ndisk_layout = \"copy\"\n");
    let mut client = daemon.client().await;
    let (old, page) = start_new(&mut client, reporter("up-old", "old", 0)).await;
    assert!(page.contains("fresh www-present"), "{page}");
    let dir = machine_dir(&daemon, &old.id);
    assert!(dir.join("rootfs.ext4").is_file());
    assert!(
        !dir.join("base.ext4").exists(),
        "a full copy has no base link"
    );
    let stopped = pb::MachineRef { id: old.id.clone() };
    client
        .machines
        .stop_machine(stopped.clone())
        .await
        .expect("stop");
    wait_for(&mut client, &old.id, pb::MachineState::Stopped).await;
    drop(client);

    // The daemon of before is gone; its record is in the old version; the new daemon
    // (overlay by default) takes over.
    daemon.kill();
    downgrade_record(&daemon.dir.path().join("data/hearth.redb"), &old.id);
    daemon.rewrite_config(|text| text.replace("disk_layout = \"copy\"", ""));
    daemon.spawn();
    let mut client = daemon.client().await;
    client
        .machines
        .start_machine(stopped)
        .await
        .expect("start after the upgrade");
    let started = wait_for(&mut client, &old.id, pb::MachineState::Started).await;
    let page = http_get(&started.guest_ip, 80);
    assert!(page.contains("had-old www-gone"), "{page}");
    assert!(!dir.join("base.ext4").exists(), "still a full copy");
    // A machine made now gets the new layout beside it.
    let (new, page) = start_new(&mut client, reporter("up-new", "new", 0)).await;
    assert!(page.contains("fresh www-present"), "{page}");
    assert!(machine_dir(&daemon, &new.id).join("base.ext4").is_file());

    destroy(&mut client, &old.id).await;
    destroy(&mut client, &new.id).await;
    assert!(!dir.exists());
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}
