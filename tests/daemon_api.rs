//! hearthd as a real process (root): the API over its Unix socket, validation that leaves
//! nothing behind, idempotent creates, unique names, records that survive SIGKILL.

mod support;

use hearth::api::pb;
use support::{Daemon, wait_for};
use tonic::Code;

const CONFIG: &str = "";

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
        start: None,
    }
}

/// `request` with its spec changed by `change`.
fn with_spec(
    mut request: pb::CreateMachineRequest,
    change: impl FnOnce(&mut pb::MachineSpec),
) -> pb::CreateMachineRequest {
    if let Some(spec) = request.spec.as_mut() {
        change(spec);
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_leave_nothing() {
    let daemon = Daemon::start_with(CONFIG);
    let mut client = daemon.client().await;
    let missing_image = format!("{}/no/such/image", std::env::temp_dir().display());
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
            create("r1", "web", &missing_image, 1, 128),
            Code::NotFound,
            "spec.image",
        ),
        // Outside images.local_roots: refused before its existence is looked at.
        (
            create("r1", "web", "/no/such/image", 1, 128),
            Code::InvalidArgument,
            "images.local_roots",
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
                start: None,
            },
            Code::InvalidArgument,
            "spec.image",
        ),
        (
            with_spec(create("r1", "web", "demo", 1, 128), |s| {
                s.workdir = "srv".into()
            }),
            Code::InvalidArgument,
            "spec.workdir",
        ),
        (
            with_spec(create("r1", "web", "demo", 1, 128), |s| {
                s.user = "a b".into()
            }),
            Code::InvalidArgument,
            "spec.user",
        ),
        (
            with_spec(create("r1", "web", "demo", 1, 128), |s| {
                s.entrypoint = vec![String::new()]
            }),
            Code::InvalidArgument,
            "spec.entrypoint",
        ),
        (
            with_spec(create("r1", "web", "demo", 1, 128), |s| {
                s.disk_mib = u32::MAX
            }),
            Code::InvalidArgument,
            "spec.disk_mib",
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
            ..Default::default()
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
    daemon.assert_no_host_leftovers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_idempotent_names_unique_and_records_survive_sigkill() {
    let mut daemon = Daemon::start_with(CONFIG);
    let mut client = daemon.client().await;
    let first = client
        .machines
        .create_machine(create("req-1", "web", "demo", 1, 128))
        .await
        .expect("create")
        .into_inner();
    // The same request again returns the same machine; the same request id with another
    // body is refused, naming request_id; the same name is taken.
    let again = client
        .machines
        .create_machine(create("req-1", "web", "demo", 1, 128))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(again.id, first.id);
    for other in [
        create("req-1", "other", "demo", 1, 128),
        create("req-1", "web", "demo", 2, 128),
        with_spec(create("req-1", "web", "demo", 1, 128), |s| {
            s.env.insert("A".into(), "1".into());
        }),
    ] {
        let reused = client.machines.create_machine(other).await.unwrap_err();
        assert_eq!(reused.code(), Code::FailedPrecondition, "{reused:?}");
        assert!(
            reused.message().starts_with("request_id:") && reused.message().contains(&first.id),
            "{}",
            reused.message()
        );
    }
    let taken = client
        .machines
        .create_machine(create("req-2", "web", "demo", 1, 128))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);
    assert!(taken.message().contains("name"), "{}", taken.message());
    let started = wait_for(&mut client, &first.id, pb::MachineState::Started).await;
    for step in [
        "image",
        "disk",
        "lease",
        "network",
        "vm_config",
        "vmm",
        "ready",
        "publish",
    ] {
        assert!(
            started
                .timings
                .iter()
                .any(|t| t.step == step && t.direction == "acquire" && t.outcome == "ok"),
            "{step} missing: {:?}",
            started.timings
        );
    }

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
    assert_eq!(found.request_id, "req-1");
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
    let node = client
        .node
        .get_node(pb::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node.ip_slots_used, 0, "the lease was released");
    daemon.assert_no_host_leftovers();
    // The name is free again once the machine is destroyed, and the old request id still
    // answers with the destroyed machine (until its retention is over).
    let retry = client
        .machines
        .create_machine(create("req-1", "web", "demo", 1, 128))
        .await
        .expect("old request id")
        .into_inner();
    assert_eq!(retry.id, first.id);
    let reused = client
        .machines
        .create_machine(create("req-3", "web", "demo", 1, 128))
        .await
        .expect("name reused")
        .into_inner();
    client
        .machines
        .destroy_machine(pb::MachineRef {
            id: reused.id.clone(),
        })
        .await
        .expect("destroy");
    wait_for(&mut client, &reused.id, pb::MachineState::Destroyed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_what_the_host_has_no_room_for_with_the_figures() {
    // A /28 holds two /29 address blocks, and the last is the guest resolver's (never
    // leased): one machine fits. The data dir's filesystem is asked to keep more free than
    // any disk has.
    let small_pool = |extra: &str| {
        let mut daemon = Daemon::prepare(extra);
        daemon.rewrite_config(|text| text.replace(".0/24\"", ".0/28\""));
        daemon.spawn();
        daemon
    };
    let daemon = small_pool("[capacity]\nmin_free_mib = 1099511627776");
    let mut client = daemon.client().await;
    let disk = client
        .machines
        .create_machine(create("disk-1", "big", "demo", 1, 128))
        .await
        .unwrap_err();
    assert_eq!(disk.code(), Code::ResourceExhausted, "{disk:?}");
    assert!(
        disk.message().contains("MiB free") && disk.message().contains("capacity.min_free_mib"),
        "{}",
        disk.message()
    );
    assert!(
        support::all_machines(&mut client).await.is_empty(),
        "nothing recorded"
    );
    drop(client);
    drop(daemon);

    let daemon = small_pool("");
    let mut client = daemon.client().await;
    let mut ids = Vec::new();
    for (request, name) in [("ip-1", "one")] {
        let machine = client
            .machines
            .create_machine(create(request, name, "demo", 1, 128))
            .await
            .expect("admitted")
            .into_inner();
        ids.push(machine.id);
    }
    let full = client
        .machines
        .create_machine(create("ip-2", "two", "demo", 1, 128))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().contains("network.pool") && full.message().contains("all 1 address blocks"),
        "{}",
        full.message()
    );
    for id in &ids {
        support::destroy(&mut client, id).await;
    }
    // Destroyed machines give their blocks back.
    let after = client
        .machines
        .create_machine(create("ip-3", "three", "demo", 1, 128))
        .await
        .expect("room again")
        .into_inner();
    support::destroy(&mut client, &after.id).await;
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

/// Host paths are images only under `images.local_roots`: with none (the default), a
/// create or a pull naming one is INVALID_ARGUMENT naming the key, whether or not the
/// path exists (nothing is read); with a root, a path outside it, or a link inside it
/// that leads out, is refused the same way, and a path inside is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_are_images_only_under_the_local_roots() {
    let daemon = Daemon::start_with("[images]\nlocal_roots = []\n");
    let mut client = daemon.client().await;
    for image in [
        "/etc",
        "/etc/shadow.tar",
        "oci:/var/lib/x",
        "/nonexistent/dir",
    ] {
        let mut request = support::demo_request("roots-1", "roots", &["/bin/true"]);
        if let Some(spec) = request.spec.as_mut() {
            spec.image = image.into();
        }
        let err = client
            .machines
            .create_machine(request)
            .await
            .expect_err(image);
        assert_eq!(err.code(), Code::InvalidArgument, "{image}: {err:?}");
        assert!(
            err.message().contains("images.local_roots"),
            "{image}: {err:?}"
        );
        let err = support::pull_error(&mut client, image).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{image}: {err:?}");
        assert!(
            err.message().contains("images.local_roots"),
            "{image}: {err:?}"
        );
    }
    drop(client);
    drop(daemon);

    let root = tempfile::tempdir().expect("root");
    std::fs::create_dir_all(root.path().join("app/bin")).expect("tree");
    std::fs::write(root.path().join("app/bin/x"), b"x").expect("file");
    std::os::unix::fs::symlink("/etc", root.path().join("escape")).expect("symlink");
    let daemon = Daemon::start_with(&format!(
        "[images]\nlocal_roots = [\"{}\"]\n",
        root.path().display()
    ));
    let mut client = daemon.client().await;
    let escape = root.path().join("escape").display().to_string();
    for image in ["/etc", escape.as_str()] {
        let err = support::pull_error(&mut client, image).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{image}: {err:?}");
        assert!(
            err.message().contains("images.local_roots"),
            "{image}: {err:?}"
        );
    }
    let inside = root.path().join("app").display().to_string();
    let mut stream = client
        .images
        .pull_image(pb::PullImageRequest {
            image: inside.clone(),
        })
        .await
        .expect("pull")
        .into_inner();
    while let Some(event) = stream.message().await.expect("pull inside the root") {
        let _ = event;
    }
}
