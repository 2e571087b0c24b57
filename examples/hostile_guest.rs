//! A guest init that breaks the agent protocol on purpose, for `tests/hostile_guest.rs`.
//!
//! Inside a normal guest `hearth-init` (PID 1) holds the agent port, so a workload cannot
//! write to it; what can send the host arbitrary bytes is a guest whose init is taken over.
//! This program stands in for one: the test configures it as the guest's init
//! (`guest.init_binary`), and it does just enough of a boot to reach the channel (kernel
//! filesystems, modules, the config disk, the network, reusing `hearth-init`'s own code
//! for them), then misbehaves as the workload's command on its config disk says:
//!
//! ```text
//! garbage              floods the channel with bytes that are never a message
//! long-line            a line of megabytes ending in a Ready, then one that never ends
//! ready-early SECS     says Ready at once; listens on its declared ports SECS seconds
//!                      later ("never": not at all)
//! exit-hints           sends thousands of Exited events unasked, without reading, then
//!                      counts the host's Status requests, then listens and says Ready
//! claims-exited        says its workload exited before it was ready
//! reboot-after SECS    listens, says Ready, and SECS seconds later reboots the machine
//!                      (as `echo b > /proc/sysrq-trigger` would): each boot does it again
//! dns-abuse N SECS     listens, says Ready, then opens N TCP connections to its resolver
//!                      (port 53), keeping every one the host leaves open, and floods the
//!                      resolver with UDP queries for SECS seconds (then idles)
//! ```
//!
//! The console (the serial log the host keeps) gets a few `hostile-guest:` lines the test
//! reads. Built static by `deploy/build-guest-init.sh` as `hostile_guest-static`.

#[allow(dead_code)]
#[path = "../src/bin/hearth-init/boot.rs"]
mod boot;
#[allow(dead_code)]
#[path = "../src/bin/hearth-init/cmdline.rs"]
mod cmdline;
#[allow(dead_code)]
#[path = "../src/bin/hearth-init/disks.rs"]
mod disks;
#[allow(dead_code)]
#[path = "../src/bin/hearth-init/net.rs"]
mod net;

use std::convert::Infallible;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth::guest::INITRAMFS_MODULE_DIR;
use hearth::guest::protocol::{
    AGENT_PORT_NAME, ExitStatus, GuestMessage, GuestState, HostMessage, LineSplitter, decode_line,
    encode_line,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// How long the devices may take to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// Bytes of the over-long line before the Ready hidden at its end.
const LONG_LINE: usize = 16 << 20;
/// Exited events sent unasked in `exit-hints`.
const EXIT_HINTS: u32 = 2000;

fn main() {
    let error = match run() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    say(&format!("fatal: {error}"));
    boot::halt()
}

/// What the command asks of this guest.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Garbage,
    LongLine,
    ReadyEarly { listen_after: Option<Duration> },
    ExitHints,
    ClaimsExited,
    RebootAfter(Duration),
    DnsAbuse { connections: usize, flood: Duration },
}

impl Mode {
    /// The mode from the workload's argv (`[program, mode, args...]`).
    fn parse(argv: &[String]) -> Result<Mode, String> {
        let word = |i: usize| argv.get(i).map(String::as_str).unwrap_or_default();
        match word(1) {
            "garbage" => Ok(Mode::Garbage),
            "long-line" => Ok(Mode::LongLine),
            "ready-early" => {
                let listen_after = match word(2) {
                    "never" => None,
                    secs => Some(Duration::from_secs(
                        secs.parse().map_err(|_| format!("ready-early: {secs:?}"))?,
                    )),
                };
                Ok(Mode::ReadyEarly { listen_after })
            }
            "exit-hints" => Ok(Mode::ExitHints),
            "claims-exited" => Ok(Mode::ClaimsExited),
            "reboot-after" => {
                let secs = word(2);
                Ok(Mode::RebootAfter(Duration::from_secs(
                    secs.parse()
                        .map_err(|_| format!("reboot-after: {secs:?}"))?,
                )))
            }
            "dns-abuse" => {
                let (n, secs) = (word(2), word(3));
                Ok(Mode::DnsAbuse {
                    connections: n.parse().map_err(|_| format!("dns-abuse: {n:?}"))?,
                    flood: Duration::from_secs(
                        secs.parse().map_err(|_| format!("dns-abuse: {secs:?}"))?,
                    ),
                })
            }
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

fn run() -> Result<Infallible, String> {
    boot::mount_early().map_err(|e| e.to_string())?;
    boot::load_modules(&Path::new("/").join(INITRAMFS_MODULE_DIR)).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + DEVICE_WAIT;
    let port = find_port(deadline)?;
    let found = disks::find(deadline).map_err(|e| e.to_string())?;
    let config = found.config;
    net::configure(config.network.as_ref(), deadline).map_err(|e| e.to_string())?;
    let mode = Mode::parse(&config.command)?;
    say(&format!("mode {mode:?}"));
    let mut port = File::options()
        .read(true)
        .write(true)
        .open(&port)
        .map_err(|e| format!("{}: {e}", port.display()))?;
    match mode {
        Mode::Garbage => garbage(&mut port),
        Mode::LongLine => long_line(&mut port),
        Mode::ReadyEarly { listen_after } => {
            if let Some(after) = listen_after {
                let ports = config.ports.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(after);
                    listen(&ports);
                });
            }
            say_ready(&mut port)?;
            serve(&mut port, ready())
        }
        Mode::ExitHints => {
            let ports = config.ports.clone();
            std::thread::spawn(move || listen(&ports));
            exit_hints(&mut port)?;
            say_ready(&mut port)?;
            serve(&mut port, ready())
        }
        Mode::RebootAfter(after) => {
            let ports = config.ports.clone();
            std::thread::spawn(move || listen(&ports));
            std::thread::spawn(move || {
                std::thread::sleep(after);
                say("rebooting");
                // No sync, no goodbye: the machine just goes, as a kernel panic or a
                // sysrq reboot would have it.
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            });
            say_ready(&mut port)?;
            serve(&mut port, ready())
        }
        Mode::DnsAbuse { connections, flood } => {
            let resolver = config
                .network
                .as_ref()
                .and_then(|n| n.resolver.as_ref())
                .map(|r| r.nameserver)
                .ok_or("dns-abuse: the config names no resolver")?;
            let ports = config.ports.clone();
            std::thread::spawn(move || listen(&ports));
            // After Ready (thousands of connects take a while under emulation).
            std::thread::spawn(move || {
                let held = hold_connections(resolver, connections);
                say(&format!(
                    "dns-abuse: {} of {connections} connections open",
                    held.len()
                ));
                let sent = flood_queries(resolver, flood);
                say(&format!("dns-abuse: {sent} queries sent"));
                drop(held);
            });
            say_ready(&mut port)?;
            serve(&mut port, ready())
        }
        Mode::ClaimsExited => {
            let exited = GuestState::Exited {
                boot_ms: None,
                status: ExitStatus::Code(3),
            };
            send(
                &mut port,
                &GuestMessage::Exited {
                    status: ExitStatus::Code(3),
                },
            )?;
            serve(&mut port, exited)
        }
    }
}

/// Opens up to `n` TCP connections to `resolver:53`, each with a short connect timeout;
/// the ones that open are returned (held while the caller keeps them).
fn hold_connections(resolver: std::net::Ipv4Addr, n: usize) -> Vec<std::net::TcpStream> {
    // Room for them all (PID 1 is root; the default is 1,024 descriptors).
    let room = (n + 256) as libc::rlim_t;
    // SAFETY: setrlimit reads the struct it is given, nothing else.
    unsafe {
        libc::setrlimit(
            libc::RLIMIT_NOFILE,
            &libc::rlimit {
                rlim_cur: room,
                rlim_max: room,
            },
        );
    }
    let address = std::net::SocketAddr::from((resolver, 53));
    (0..n)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()
        })
        .collect()
}

/// Sends A queries for a name in the resolver's domain over UDP, as fast as it can, for
/// `lasting`; returns how many were sent.
fn flood_queries(resolver: std::net::Ipv4Addr, lasting: Duration) -> u64 {
    let Ok(socket) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return 0;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(1)));
    let end = Instant::now() + lasting;
    let mut sent = 0u64;
    let mut answer = [0u8; 512];
    while Instant::now() < end {
        // id, flags (recursion desired), 1 question; then the name, A, IN.
        let id = (sent as u16).to_be_bytes();
        let mut query = vec![id[0], id[1], 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["flood", "hearth", "internal"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        if socket.send_to(&query, (resolver, 53)).is_ok() {
            sent += 1;
        }
        let _ = socket.recv(&mut answer);
    }
    sent
}

/// One console line (the init's stderr is the console).
fn say(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "hostile-guest: {text}");
    let _ = err.flush();
}

/// The device node of the agent port, once the host's name for it arrived.
fn find_port(deadline: Instant) -> Result<PathBuf, String> {
    loop {
        for ent in fs::read_dir("/sys/class/virtio-ports")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = fs::read_to_string(ent.path().join("name")).unwrap_or_default();
            let dev = Path::new("/dev").join(ent.file_name());
            if name.trim_end() == AGENT_PORT_NAME && dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no port named {AGENT_PORT_NAME}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Writes all of `bytes`; a write blocks while no host is connected.
fn write(port: &mut File, bytes: &[u8]) -> Result<(), String> {
    port.write_all(bytes).map_err(|e| format!("write: {e}"))
}

fn send(port: &mut File, msg: &GuestMessage) -> Result<(), String> {
    write(port, &encode_line(msg))
}

fn ready() -> GuestState {
    GuestState::Ready {
        boot_ms: boot::uptime_ms(),
    }
}

/// Says Ready, unasked, as soon as a host reads.
fn say_ready(port: &mut File) -> Result<(), String> {
    say("saying ready");
    send(
        port,
        &GuestMessage::Ready {
            boot_ms: boot::uptime_ms(),
        },
    )
}

/// Listens on `ports` (every address) and answers each connection with a line.
fn listen(ports: &[u16]) {
    let mut listeners = Vec::new();
    for &p in ports {
        match TcpListener::bind(("0.0.0.0", p)) {
            Ok(l) => listeners.push(l),
            Err(e) => say(&format!("listen on {p}: {e}")),
        }
    }
    say(&format!("listening on {ports:?}"));
    for l in listeners {
        std::thread::spawn(move || {
            for mut conn in l.incoming().flatten() {
                // Read the request first: closing with it unread would reset the
                // connection before the client reads the reply.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.read(&mut [0u8; 4096]);
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhostile guest\n");
                let _ = conn.shutdown(std::net::Shutdown::Write);
            }
        });
    }
}

/// Answers the host as an honest init in `state` would, forever: Status with the state,
/// Shutdown by powering off.
fn serve(port: &mut File, state: GuestState) -> Result<Infallible, String> {
    let mut lines = LineSplitter::for_messages::<HostMessage>();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match port.read(&mut buf) {
            // No host on the other side: look again shortly.
            Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(20)),
            Ok(n) => lines.push(&buf[..n]),
        }
        while let Some(line) = lines.next_line() {
            let Ok(line) = line else { continue };
            match decode_line::<HostMessage>(&line) {
                Ok(HostMessage::Status) | Ok(HostMessage::Claim(_)) => {
                    let _ = send(
                        port,
                        &GuestMessage::Status {
                            state: state.clone(),
                        },
                    );
                }
                Ok(HostMessage::Shutdown) => {
                    let _ = send(port, &GuestMessage::ShuttingDown);
                    boot::halt();
                }
                Err(_) => {}
            }
        }
    }
}

/// A small deterministic generator (xorshift): the flood needs variety, not secrecy.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Fragments that look like messages but are not one, each on its own line: wrong
/// types, truncations, overflows, a nesting bomb, terminal escapes, invalid UTF-8.
const LURES: &[&[u8]] = &[
    b"{\"type\":\"ready\"",
    b"{\"type\":\"ready\",\"boot_ms\":-1}",
    b"{\"type\":\"ready\",\"boot_ms\":1.5}",
    b"{\"type\":\"ready\",\"boot_ms\":\"7\"}",
    b"{\"type\":\"ready\",\"boot_ms\":18446744073709551616}",
    b"{\"type\":\"status\",\"state\":{\"phase\":\"ready\"}}",
    b"{\"type\":\"status\",\"state\":{\"phase\":\"launched\",\"boot_ms\":1}}",
    b"{\"type\":\"reboot\"}",
    b"{\"type\":\"ready\",\"boot_ms\":1} trailing",
    b"\x1b[2J\x1b]0;owned by the guest\x07\rhearthd: all good",
    b"\xff\xfe\xfd{\"type\":\"ready\",\"boot_ms\":1}",
    b"[1,2,3]",
    b"null",
];

/// Floods the channel, forever, with lines that are never a message.
fn garbage(port: &mut File) -> Result<Infallible, String> {
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut chunk = Vec::with_capacity(64 * 1024);
    // Deeper than the JSON parser recurses, shorter than a line may be.
    let bomb = "[".repeat(60_000);
    let mut sent: u64 = 0;
    loop {
        chunk.clear();
        while chunk.len() < 60 * 1024 {
            match noise.next() % 8 {
                0 => chunk.extend_from_slice(LURES[(noise.next() % LURES.len() as u64) as usize]),
                1 if noise.next().is_multiple_of(64) => chunk.extend_from_slice(bomb.as_bytes()),
                _ => {
                    let len = (noise.next() % 300) as usize;
                    // Random bytes without a newline, so each line ends where chosen.
                    chunk.extend((0..len).map(|_| match (noise.next() & 0xff) as u8 {
                        b'\n' => b'?',
                        b => b,
                    }));
                }
            }
            chunk.push(b'\n');
        }
        write(port, &chunk)?;
        sent += chunk.len() as u64;
        if sent.is_power_of_two() || sent % (32 << 20) < chunk.len() as u64 {
            say(&format!("garbage sent: {} MiB", sent >> 20));
        }
    }
}

/// A line of [`LONG_LINE`] spaces with a Ready at its end (JSON allows the spaces before
/// it: a host that resynchronised inside the line would believe it), then a line of
/// spaces that never ends.
fn long_line(port: &mut File) -> Result<Infallible, String> {
    let spaces = vec![b' '; 64 * 1024];
    for _ in 0..LONG_LINE / spaces.len() {
        write(port, &spaces)?;
    }
    write(port, &encode_line(&GuestMessage::Ready { boot_ms: 1 }))?;
    say(&format!(
        "sent a line of {} MiB ending in Ready",
        LONG_LINE >> 20
    ));
    loop {
        write(port, &spaces)?;
    }
}

/// Sends [`EXIT_HINTS`] Exited events without reading what the host sends, waits, then
/// counts the Status requests that arrived meanwhile and tells the console.
fn exit_hints(port: &mut File) -> Result<(), String> {
    for i in 0..EXIT_HINTS {
        let status = if i % 2 == 0 {
            ExitStatus::Code(i as i32)
        } else {
            ExitStatus::Signal(9)
        };
        send(port, &GuestMessage::Exited { status })?;
    }
    say(&format!("sent {EXIT_HINTS} exit hints"));
    std::thread::sleep(Duration::from_secs(2));
    let mut lines = LineSplitter::for_messages::<HostMessage>();
    let mut buf = vec![0u8; 64 * 1024];
    let mut asked = 0u32;
    loop {
        let readable = {
            let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(500u16)).map_err(|e| format!("poll: {e}"))? > 0
        };
        if !readable {
            break;
        }
        match port.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => lines.push(&buf[..n]),
        }
        while let Some(line) = lines.next_line() {
            if let Ok(Ok(HostMessage::Status)) = line.map(|l| decode_line::<HostMessage>(&l)) {
                asked += 1;
            }
        }
    }
    say(&format!(
        "status requests after {EXIT_HINTS} exit hints: {asked}"
    ));
    Ok(())
}
