//! Every request hearth sends, checked against the shapes of Firecracker's published API
//! specification (swagger 2.0 `firecracker.yaml`, v1.x).
//!
//! The expectations below are written from the specification, not generated from our own
//! types: endpoints (method and path template), and for each body definition its required
//! properties, every property it allows, their JSON types, bounds and enum values. A body
//! passes only if it has every required property, nothing the definition does not allow,
//! and every value has the specified type. Path parameters must equal the body's id field,
//! as Firecracker requires.

use serde_json::Value;

use super::*;

/// A property's type in the specification.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Bool,
    Int { min: Option<i64>, max: Option<i64> },
    Enum(&'static [&'static str]),
    Obj(&'static Def),
    ArrayOf(&'static Def),
}

/// An object definition.
struct Def {
    name: &'static str,
    required: &'static [&'static str],
    props: &'static [(&'static str, Ty)],
}

const INT: Ty = Ty::Int {
    min: None,
    max: None,
};

// ---- definitions, as the specification states them ----

static MACHINE_CONFIGURATION: Def = Def {
    name: "MachineConfiguration",
    required: &["mem_size_mib", "vcpu_count"],
    props: &[
        (
            "cpu_template",
            Ty::Enum(&["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]),
        ),
        ("smt", Ty::Bool),
        ("mem_size_mib", INT),
        ("track_dirty_pages", Ty::Bool),
        (
            "vcpu_count",
            Ty::Int {
                min: Some(1),
                max: Some(32),
            },
        ),
        ("huge_pages", Ty::Enum(&["None", "Transparent", "2M"])),
    ],
};

static BOOT_SOURCE: Def = Def {
    name: "BootSource",
    required: &["kernel_image_path"],
    props: &[
        ("boot_args", Ty::Str),
        ("initrd_path", Ty::Str),
        ("kernel_image_path", Ty::Str),
    ],
};

static TOKEN_BUCKET: Def = Def {
    name: "TokenBucket",
    required: &["refill_time", "size"],
    props: &[
        (
            "one_time_burst",
            Ty::Int {
                min: Some(0),
                max: None,
            },
        ),
        (
            "refill_time",
            Ty::Int {
                min: Some(0),
                max: None,
            },
        ),
        (
            "size",
            Ty::Int {
                min: Some(0),
                max: None,
            },
        ),
    ],
};

static RATE_LIMITER: Def = Def {
    name: "RateLimiter",
    required: &[],
    props: &[
        ("bandwidth", Ty::Obj(&TOKEN_BUCKET)),
        ("ops", Ty::Obj(&TOKEN_BUCKET)),
    ],
};

static DRIVE: Def = Def {
    name: "Drive",
    required: &["drive_id", "is_root_device"],
    props: &[
        ("drive_id", Ty::Str),
        ("partuuid", Ty::Str),
        ("is_root_device", Ty::Bool),
        ("cache_type", Ty::Enum(&["Unsafe", "Writeback"])),
        ("is_read_only", Ty::Bool),
        ("path_on_host", Ty::Str),
        ("rate_limiter", Ty::Obj(&RATE_LIMITER)),
        ("io_engine", Ty::Enum(&["Sync", "Async"])),
        ("socket", Ty::Str),
    ],
};

static NETWORK_INTERFACE: Def = Def {
    name: "NetworkInterface",
    required: &["host_dev_name", "iface_id"],
    props: &[
        ("guest_mac", Ty::Str),
        ("host_dev_name", Ty::Str),
        ("iface_id", Ty::Str),
        (
            "mtu",
            Ty::Int {
                min: Some(68),
                max: Some(65535),
            },
        ),
        ("rx_rate_limiter", Ty::Obj(&RATE_LIMITER)),
        ("tx_rate_limiter", Ty::Obj(&RATE_LIMITER)),
    ],
};

static VSOCK: Def = Def {
    name: "Vsock",
    required: &["guest_cid", "uds_path"],
    props: &[
        (
            "guest_cid",
            Ty::Int {
                min: Some(3),
                max: None,
            },
        ),
        ("uds_path", Ty::Str),
        ("vsock_id", Ty::Str),
    ],
};

static LOGGER: Def = Def {
    name: "Logger",
    required: &[],
    props: &[
        (
            "level",
            Ty::Enum(&["Error", "Warning", "Info", "Debug", "Trace", "Off"]),
        ),
        ("log_path", Ty::Str),
        ("show_level", Ty::Bool),
        ("show_log_origin", Ty::Bool),
        ("module", Ty::Str),
    ],
};

static METRICS: Def = Def {
    name: "Metrics",
    required: &["metrics_path"],
    props: &[("metrics_path", Ty::Str)],
};

static SERIAL_DEVICE: Def = Def {
    name: "SerialDevice",
    required: &[],
    props: &[
        ("serial_out_path", Ty::Str),
        ("rate_limiter", Ty::Obj(&TOKEN_BUCKET)),
    ],
};

static INSTANCE_ACTION_INFO: Def = Def {
    name: "InstanceActionInfo",
    required: &["action_type"],
    props: &[(
        "action_type",
        Ty::Enum(&["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]),
    )],
};

static VM: Def = Def {
    name: "Vm",
    required: &["state"],
    props: &[("state", Ty::Enum(&["Paused", "Resumed"]))],
};

static SNAPSHOT_CREATE_PARAMS: Def = Def {
    name: "SnapshotCreateParams",
    required: &["mem_file_path", "snapshot_path"],
    props: &[
        ("mem_file_path", Ty::Str),
        ("snapshot_path", Ty::Str),
        ("snapshot_type", Ty::Enum(&["Full", "Diff"])),
    ],
};

static MEMORY_BACKEND: Def = Def {
    name: "MemoryBackend",
    required: &["backend_type", "backend_path"],
    props: &[
        ("backend_type", Ty::Enum(&["File", "Uffd"])),
        ("backend_path", Ty::Str),
    ],
};

static NETWORK_OVERRIDE: Def = Def {
    name: "NetworkOverride",
    required: &["iface_id", "host_dev_name"],
    props: &[("iface_id", Ty::Str), ("host_dev_name", Ty::Str)],
};

static VSOCK_OVERRIDE: Def = Def {
    name: "VsockOverride",
    required: &["uds_path"],
    props: &[("uds_path", Ty::Str)],
};

static SNAPSHOT_LOAD_PARAMS: Def = Def {
    name: "SnapshotLoadParams",
    required: &["snapshot_path"],
    props: &[
        ("enable_diff_snapshots", Ty::Bool),
        ("track_dirty_pages", Ty::Bool),
        ("mem_file_path", Ty::Str),
        ("mem_backend", Ty::Obj(&MEMORY_BACKEND)),
        ("snapshot_path", Ty::Str),
        ("resume_vm", Ty::Bool),
        ("network_overrides", Ty::ArrayOf(&NETWORK_OVERRIDE)),
        ("vsock_override", Ty::Obj(&VSOCK_OVERRIDE)),
        ("clock_realtime", Ty::Bool),
    ],
};

/// An endpoint: method, path template, and the body definition (none: no body).
struct Endpoint {
    method: &'static str,
    path: &'static str,
    body: Option<&'static Def>,
    /// For `/x/{param}` paths: the body field that must equal the parameter.
    id_field: Option<&'static str>,
}

static ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "GET",
        path: "/",
        body: None,
        id_field: None,
    },
    Endpoint {
        method: "GET",
        path: "/version",
        body: None,
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/machine-config",
        body: Some(&MACHINE_CONFIGURATION),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/boot-source",
        body: Some(&BOOT_SOURCE),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/drives/{drive_id}",
        body: Some(&DRIVE),
        id_field: Some("drive_id"),
    },
    Endpoint {
        method: "PUT",
        path: "/network-interfaces/{iface_id}",
        body: Some(&NETWORK_INTERFACE),
        id_field: Some("iface_id"),
    },
    Endpoint {
        method: "PUT",
        path: "/vsock",
        body: Some(&VSOCK),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/logger",
        body: Some(&LOGGER),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/metrics",
        body: Some(&METRICS),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/serial",
        body: Some(&SERIAL_DEVICE),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/actions",
        body: Some(&INSTANCE_ACTION_INFO),
        id_field: None,
    },
    Endpoint {
        method: "PATCH",
        path: "/vm",
        body: Some(&VM),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/snapshot/create",
        body: Some(&SNAPSHOT_CREATE_PARAMS),
        id_field: None,
    },
    Endpoint {
        method: "PUT",
        path: "/snapshot/load",
        body: Some(&SNAPSHOT_LOAD_PARAMS),
        id_field: None,
    },
];

/// Checks `value` against `def`; the error names the property path.
fn check_object(value: &Value, def: &Def, at: &str) -> Result<(), String> {
    let Value::Object(map) = value else {
        return Err(format!("{at}: {} must be an object", def.name));
    };
    for req in def.required {
        if !map.contains_key(*req) {
            return Err(format!("{at}: {} lacks required `{req}`", def.name));
        }
    }
    for (key, v) in map {
        let Some((_, ty)) = def.props.iter().find(|(name, _)| name == key) else {
            return Err(format!("{at}: {} has no property `{key}`", def.name));
        };
        check_value(v, *ty, &format!("{at}.{key}"))?;
    }
    Ok(())
}

fn check_value(v: &Value, ty: Ty, at: &str) -> Result<(), String> {
    match ty {
        Ty::Str if v.is_string() => Ok(()),
        Ty::Bool if v.is_boolean() => Ok(()),
        Ty::Int { min, max } => {
            let n = v
                .as_i64()
                .ok_or_else(|| format!("{at}: {v} is not an integer"))?;
            if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
                return Err(format!("{at}: {n} outside [{min:?}, {max:?}]"));
            }
            Ok(())
        }
        Ty::Enum(allowed) => match v.as_str() {
            Some(s) if allowed.contains(&s) => Ok(()),
            _ => Err(format!("{at}: {v} is not one of {allowed:?}")),
        },
        Ty::Obj(def) => check_object(v, def, at),
        Ty::ArrayOf(def) => {
            let items = v
                .as_array()
                .ok_or_else(|| format!("{at}: {v} is not an array"))?;
            for (i, item) in items.iter().enumerate() {
                check_object(item, def, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        Ty::Str | Ty::Bool => Err(format!("{at}: {v} has the wrong type")),
    }
}

/// Finds the endpoint for a request and checks its body.
fn check_request(req: &Request) -> Result<(), String> {
    let method = req.method().as_str();
    let path = req.path();
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| e.method == method && path_matches(e.path, &path))
        .ok_or_else(|| format!("{method} {path} is not an endpoint of the specification"))?;
    let body = req.body();
    match (endpoint.body, &body) {
        (None, None) => return Ok(()),
        (None, Some(_)) => return Err(format!("{method} {path} takes no body")),
        (Some(def), None) => return Err(format!("{method} {path} needs a {} body", def.name)),
        (Some(def), Some(b)) => check_object(b, def, def.name)?,
    }
    if let (Some(field), Some(b)) = (endpoint.id_field, &body) {
        let param = path.rsplit('/').next().unwrap_or_default();
        if b.get(field).and_then(Value::as_str) != Some(param) {
            return Err(format!(
                "{method} {path}: body `{field}` differs from the path"
            ));
        }
    }
    Ok(())
}

/// `/drives/{drive_id}` matches `/drives/root`; fixed paths match themselves.
fn path_matches(template: &str, path: &str) -> bool {
    match template.split_once('{') {
        Some((prefix, _)) => {
            path.starts_with(prefix)
                && path.len() > prefix.len()
                && !path[prefix.len()..].contains('/')
        }
        None => template == path,
    }
}

/// One request of every kind hearth sends, with every optional field it can set filled.
fn every_request() -> Vec<Request> {
    vec![
        Request::DescribeInstance,
        Request::Version,
        Request::MachineConfig(MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: Some(false),
            track_dirty_pages: Some(true),
        }),
        Request::MachineConfig(MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: None,
            track_dirty_pages: None,
        }),
        Request::BootSource(BootSource {
            kernel_image_path: "/k/vmlinux".into(),
            initrd_path: Some("/k/initramfs.cpio".into()),
            boot_args: Some("console=ttyS0 reboot=k".into()),
        }),
        Request::Drive(Drive {
            drive_id: "root".into(),
            path_on_host: "/m/root.img".into(),
            is_root_device: false,
            is_read_only: false,
        }),
        Request::NetworkInterface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some(mac_string([0x52, 0x54, 0, 1, 2, 3])),
        }),
        Request::Vsock(Vsock {
            guest_cid: 3,
            uds_path: "/m/vsock.sock".into(),
        }),
        Request::Logger(Logger {
            log_path: "/m/firecracker.log".into(),
            level: LogLevel::Warning,
            show_level: true,
            show_log_origin: false,
        }),
        Request::Metrics(Metrics {
            metrics_path: "/m/metrics.json".into(),
        }),
        Request::Serial(SerialDevice {
            serial_out_path: "/m/serial.log".into(),
        }),
        Request::Action(InstanceActionInfo {
            action_type: ActionType::InstanceStart,
        }),
        Request::Action(InstanceActionInfo {
            action_type: ActionType::SendCtrlAltDel,
        }),
        Request::Action(InstanceActionInfo {
            action_type: ActionType::FlushMetrics,
        }),
        Request::Vm(Vm {
            state: VmState::Paused,
        }),
        Request::Vm(Vm {
            state: VmState::Resumed,
        }),
        Request::SnapshotCreate(SnapshotCreateParams {
            snapshot_path: "/m/snapshot/state".into(),
            mem_file_path: "/m/snapshot/memory".into(),
            snapshot_type: Some(SnapshotType::Full),
        }),
        Request::SnapshotLoad(SnapshotLoadParams {
            snapshot_path: "/m/snapshot/state".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/m/snapshot/memory".into(),
            },
            resume_vm: false,
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
            }],
            vsock_override: Some(VsockOverride {
                uds_path: "/n/vsock.sock".into(),
            }),
        }),
        Request::SnapshotLoad(SnapshotLoadParams {
            snapshot_path: "/m/snapshot/state".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::Uffd,
                backend_path: "/m/uffd.sock".into(),
            },
            resume_vm: true,
            network_overrides: Vec::new(),
            vsock_override: None,
        }),
    ]
}

#[test]
fn every_request_matches_the_specification() {
    let all = every_request();
    for req in &all {
        if let Err(e) = check_request(req) {
            panic!("{}: {e}", req.describe());
        }
    }
    // Every variant appears (a new variant added without a sample fails here).
    let mut seen = std::collections::HashSet::new();
    for req in &all {
        seen.insert(std::mem::discriminant(req));
    }
    assert_eq!(seen.len(), 14, "a Request variant has no sample");
}

#[test]
fn the_checker_rejects_what_the_specification_rejects() {
    // Without these, a checker that accepts everything would pass the test above.
    let bad: Vec<(Request, &str)> = vec![
        (
            Request::MachineConfig(MachineConfiguration {
                vcpu_count: 33,
                mem_size_mib: 128,
                smt: None,
                track_dirty_pages: None,
            }),
            "outside",
        ),
        (
            Request::Vsock(Vsock {
                guest_cid: 2,
                uds_path: "/v".into(),
            }),
            "outside",
        ),
    ];
    for (req, want) in bad {
        let err = check_request(&req).expect_err("must be rejected");
        assert!(err.contains(want), "{err}");
    }
    let missing = serde_json::json!({"vcpu_count": 1});
    let err = check_object(&missing, &MACHINE_CONFIGURATION, "m").unwrap_err();
    assert!(err.contains("mem_size_mib"), "{err}");
    let extra = serde_json::json!({"metrics_path": "/m", "format": "json"});
    let err = check_object(&extra, &METRICS, "m").unwrap_err();
    assert!(err.contains("format"), "{err}");
    let wrong_enum = serde_json::json!({"state": "Stopped"});
    assert!(check_object(&wrong_enum, &VM, "vm").is_err());
    let wrong_type = serde_json::json!({"drive_id": "root", "is_root_device": "no"});
    assert!(check_object(&wrong_type, &DRIVE, "d").is_err());
    // A drive whose path id differs from its body id.
    assert!(path_matches("/drives/{drive_id}", "/drives/root"));
    assert!(!path_matches("/drives/{drive_id}", "/drives/"));
    assert!(!path_matches("/drives/{drive_id}", "/drives/a/b"));
}

#[test]
fn pause_is_a_patch_and_the_rest_of_the_writes_are_puts() {
    assert_eq!(
        Request::Vm(Vm {
            state: VmState::Paused
        })
        .describe(),
        "PATCH /vm"
    );
    let body = Request::Vm(Vm {
        state: VmState::Resumed,
    })
    .body()
    .unwrap();
    assert_eq!(body, serde_json::json!({"state": "Resumed"}));
    assert_eq!(Request::Version.method(), Method::Get);
    assert!(Request::DescribeInstance.body().is_none());
}

#[test]
fn answers_decode_from_the_specified_shapes() {
    let info: InstanceInfo = serde_json::from_str(
        r#"{"app_name":"Firecracker","id":"hearth-abc","state":"Not started","vmm_version":"1.13.1"}"#,
    )
    .unwrap();
    assert_eq!(info.state, InstanceState::NotStarted);
    let info: InstanceInfo = serde_json::from_str(
        r#"{"app_name":"Firecracker","id":"x","state":"Paused","vmm_version":"1.13.1"}"#,
    )
    .unwrap();
    assert_eq!(info.state, InstanceState::Paused);
    let fault: Fault =
        serde_json::from_str(r#"{"fault_message":"The requested operation is not supported"}"#)
            .unwrap();
    assert!(fault.fault_message.contains("not supported"));
    let v: FirecrackerVersion =
        serde_json::from_str(r#"{"firecracker_version":"1.13.1"}"#).unwrap();
    assert_eq!(v.firecracker_version, "1.13.1");
}
