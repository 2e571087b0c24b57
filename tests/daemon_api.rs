//! hearthd as a real process (root): the API over its Unix socket, validation that leaves
//! nothing behind, idempotent creates, and a machine run that acquires its image, disk,
//! lease and network for real, fails at the VMM steps this build does not have yet, and
//! releases everything it acquired.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hearth::api::pb;
use hearth::client::{Client, connect};
use tonic::Code;

/// A daemon on a temporary data dir, with a test-unique resource prefix and pool.
struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    prefix: String,
    config: PathBuf,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut raw = [0u8; 2];
        getrandom::fill(&mut raw).expect("random");
        let prefix = format!("td{:02x}", raw[0]);
        let config = dir.path().join("hearthd.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{d}/data\"\ncache_dir = \"{d}/cache\"\n[api]\nsocket = \"{d}/api.sock\"\n[network]\nprefix = \"{prefix}\"\npool = \"10.216.{net}.0/24\"\n[guest]\nboot_attempts = 1\n",
                d = dir.path().display(),
                net = raw[1],
            ),
        )
        .expect("config");
        let mut daemon = Daemon {
            child: None,
            dir,
            prefix,
            config,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_hearthd"))
            .arg("--config")
            .arg(&self.config)
            .env("HEARTH_LOG", "warn")
            .spawn()
            .expect("spawn hearthd");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn client(&self) -> Client {
        let socket = self.dir.path().join("api.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut client) = connect(&socket).await
                && client.node.get_node(pb::GetNodeRequest {}).await.is_ok()
            {
                return client;
            }
            assert!(
                Instant::now() < deadline,
                "hearthd did not answer on {}",
                socket.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Namespaces and links on the host that carry this daemon's prefix.
    fn host_leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}-", self.prefix)) {
                    found.push(format!("netns {name}"));
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    found.push(format!("link {name}"));
                }
            }
        }
        found
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        for leftover in self.host_leftovers() {
            let mut parts = leftover.split(' ');
            match (parts.next(), parts.next()) {
                (Some("netns"), Some(name)) => {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
                (Some("link"), Some(name)) => {
                    let _ = Command::new("ip").args(["link", "del", name]).status();
                }
                _ => {}
            }
        }
    }
}

fn create(
    request_id: &str,
    name: &str,
    image: &str,
    vcpus: u32,
    memory_mib: u32,
) -> pb::CreateMachineRequest {
    pb::CreateMachineRequest {
        request_id: request_id.into(),
        name: name.into(),
        spec: Some(pb::MachineSpec {
            image: image.into(),
            vcpus,
            memory_mib,
            ports: vec![80],
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_leave_nothing() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let cases: Vec<(pb::CreateMachineRequest, Code, &str)> = vec![
        (
            create("a/b", "web", "demo", 1, 128),
            Code::InvalidArgument,
            "request_id",
        ),
        (
            create("..", "web", "demo", 1, 128),
            Code::InvalidArgument,
            "request_id",
        ),
        (
            create("", "web", "demo", 1, 128),
            Code::InvalidArgument,
            "request_id",
        ),
        (
            create("r1", "../x", "demo", 1, 128),
            Code::InvalidArgument,
            "name",
        ),
        (
            create("r1", "", "demo", 1, 128),
            Code::InvalidArgument,
            "name",
        ),
        (
            create("r1", "web", "demo", 0, 128),
            Code::InvalidArgument,
            "spec.vcpus",
        ),
        (
            create("r1", "web", "demo", 10_000, 128),
            Code::InvalidArgument,
            "spec.vcpus",
        ),
        (
            create("r1", "web", "demo", 1, 0),
            Code::InvalidArgument,
            "spec.memory_mib",
        ),
        (
            create("r1", "web", "demo", 1, u32::MAX),
            Code::InvalidArgument,
            "spec.memory_mib",
        ),
        (
            create("r1", "web", "", 1, 128),
            Code::InvalidArgument,
            "spec.image",
        ),
        (
            create("r1", "web", "/no/such/image", 1, 128),
            Code::NotFound,
            "spec.image",
        ),
        (
            create("r1", "web", "/etc/../root", 1, 128),
            Code::InvalidArgument,
            "spec.image",
        ),
        (
            pb::CreateMachineRequest {
                request_id: "r1".into(),
                name: "web".into(),
                spec: None,
            },
            Code::InvalidArgument,
            "spec.image",
        ),
    ];
    for (request, code, field) in cases {
        let status = client
            .machines
            .create_machine(request.clone())
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(field),
            "{request:?}: {}",
            status.message()
        );
    }
    for id in ["../etc", "a/b", "", "zzzzzzzzzz"] {
        let status = client
            .machines
            .get_machine(pb::MachineRef { id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{id}: {status:?}");
        assert!(status.message().contains("id"), "{}", status.message());
    }
    let unknown = client
        .machines
        .get_machine(pb::MachineRef {
            id: "0123456789".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let listed = client
        .machines
        .list_machines(pb::ListMachinesRequest {
            include_destroyed: true,
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.machines.is_empty(), "{:?}", listed.machines);
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node.ip_slots_used, 0);
    assert!(
        daemon.host_leftovers().is_empty(),
        "{:?}",
        daemon.host_leftovers()
    );
}

async fn wait_for(client: &mut Client, id: &str, state: pb::MachineState) -> pb::Machine {
    let reply = client
        .machines
        .wait_machine(pb::WaitMachineRequest {
            id: id.into(),
            state: state as i32,
            timeout_ms: 120_000,
        })
        .await
        .expect("wait")
        .into_inner();
    let machine = reply.machine.expect("machine");
    assert!(reply.reached, "did not reach {state:?}: {machine:?}");
    machine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_acquires_for_real_fails_at_the_missing_vmm_and_releases_everything() {
    let mut daemon = Daemon::start();
    let mut client = daemon.client().await;
    let first = client
        .machines
        .create_machine(create("req-1", "web", "demo", 1, 128))
        .await
        .expect("create")
        .into_inner();
    // The same request again returns the same machine; the same name is taken.
    let again = client
        .machines
        .create_machine(create("req-1", "other", "demo", 1, 128))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(again.id, first.id);
    let taken = client
        .machines
        .create_machine(create("req-2", "web", "demo", 1, 128))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);
    assert!(taken.message().contains("name"), "{}", taken.message());

    let failed = wait_for(&mut client, &first.id, pb::MachineState::Failed).await;
    assert!(
        failed.failure.contains("no VMM driver"),
        "{}",
        failed.failure
    );
    // Image, disk, lease and network were acquired for real, then released in reverse.
    let ran = |step: &str, direction: &str| {
        failed
            .timings
            .iter()
            .any(|t| t.step == step && t.direction == direction && t.outcome == "ok")
    };
    for step in ["image", "disk", "lease", "network"] {
        assert!(
            ran(step, "acquire"),
            "{step} acquire missing: {:?}",
            failed.timings
        );
        assert!(
            ran(step, "release"),
            "{step} release missing: {:?}",
            failed.timings
        );
    }
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node.ip_slots_used, 0, "the lease was released");
    assert!(
        daemon.host_leftovers().is_empty(),
        "{:?}",
        daemon.host_leftovers()
    );
    let machine_dir = daemon.dir.path().join("data/machines").join(&first.id);
    assert!(
        !machine_dir.exists(),
        "{} left behind",
        machine_dir.display()
    );

    // The record survives a SIGKILL of the daemon, and destroy still works after it.
    daemon.kill();
    daemon.spawn();
    let mut client = daemon.client().await;
    let found = client
        .machines
        .get_machine(pb::MachineRef {
            id: first.id.clone(),
        })
        .await
        .expect("get after restart")
        .into_inner();
    assert_eq!(found.state, pb::MachineState::Failed as i32);
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: first.id.clone(),
        })
        .await
        .expect("destroy");
    wait_for(&mut client, &first.id, pb::MachineState::Destroyed).await;
    let start = client
        .machines
        .start_machine(pb::MachineRef {
            id: first.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(start.code(), Code::FailedPrecondition);
    // The name is free again once the machine is destroyed.
    client
        .machines
        .create_machine(create("req-3", "web", "demo", 1, 128))
        .await
        .expect("name reused");
}
