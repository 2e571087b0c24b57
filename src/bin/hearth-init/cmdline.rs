//! What the host tells the init on the kernel command line, parsed in one place so each
//! setting has one meaning and a malformed one is refused by name rather than ignored.
//!
//! Pure: callers pass the text of `/proc/cmdline` (see [`crate::boot::cmdline`]).

use hearth::guest::{AGENT_CMDLINE_KEY, HALT_BY_REBOOT_FLAG};

/// The value prefix of a vsock agent transport: `hearth.agent=vsock:<port>`.
const VSOCK_PREFIX: &str = "vsock:";

/// Which channel carries the agent protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentTransport {
    /// The virtio-serial port named `hearth.agent` (QEMU); the default.
    Serial,
    /// A vsock stream the init opens to the host on this port (Firecracker).
    Vsock {
        /// The host's vsock port.
        port: u32,
    },
}

/// Why a command-line setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error(
        "kernel command line {AGENT_CMDLINE_KEY}={value:?}: expected `{VSOCK_PREFIX}<port>` with a port from 1 to 4294967294"
    )]
    AgentTransport { value: String },
}

/// The agent transport the command line asks for. With the key given more than once the
/// last one wins, as the kernel does for its own parameters.
pub fn agent_transport(cmdline: &str) -> Result<AgentTransport, CmdlineError> {
    let Some(value) = cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(AGENT_CMDLINE_KEY))
        // `hearth.agentfoo=` is another key; a bare `hearth.agent` has no value.
        .filter(|rest| rest.is_empty() || rest.starts_with('='))
        .map(|rest| rest.strip_prefix('=').unwrap_or(rest))
        .next_back()
    else {
        return Ok(AgentTransport::Serial);
    };
    let refused = || CmdlineError::AgentTransport {
        value: value.to_string(),
    };
    let port: u32 = value
        .strip_prefix(VSOCK_PREFIX)
        .and_then(|p| p.parse().ok())
        .ok_or_else(refused)?;
    // 0 is reserved and u32::MAX means "any port" (VMADDR_PORT_ANY): neither can be a
    // host listener's port.
    if port == 0 || port == u32::MAX {
        return Err(refused());
    }
    Ok(AgentTransport::Vsock { port })
}

/// Whether the machine must end with a reboot instead of a power-off.
pub fn halt_by_reboot(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == HALT_BY_REBOOT_FLAG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth::guest::AGENT_VSOCK_PORT;

    #[test]
    fn absent_key_means_serial() {
        assert_eq!(agent_transport(""), Ok(AgentTransport::Serial));
        assert_eq!(
            agent_transport("console=ttyS0 reboot=k hearth.agentx=vsock:5 panic=-1\n"),
            Ok(AgentTransport::Serial)
        );
    }

    #[test]
    fn vsock_port_is_parsed_and_last_key_wins() {
        let line = format!("console=ttyS0 {AGENT_CMDLINE_KEY}=vsock:{AGENT_VSOCK_PORT} quiet\n");
        assert_eq!(
            agent_transport(&line),
            Ok(AgentTransport::Vsock {
                port: AGENT_VSOCK_PORT
            })
        );
        assert_eq!(
            agent_transport("hearth.agent=vsock:1 hearth.agent=vsock:4294967294"),
            Ok(AgentTransport::Vsock { port: u32::MAX - 1 })
        );
    }

    #[test]
    fn malformed_values_are_refused_by_key() {
        for bad in [
            "hearth.agent",
            "hearth.agent=",
            "hearth.agent=serial",
            "hearth.agent=vsock",
            "hearth.agent=vsock:",
            "hearth.agent=vsock:x12",
            "hearth.agent=vsock:-1",
            "hearth.agent=vsock:0",
            "hearth.agent=vsock:4294967295",
            "hearth.agent=vsock:4294967296",
            "hearth.agent=VSOCK:1024",
            "hearth.agent=vsock:1024 hearth.agent=vsock:nope",
        ] {
            let err = agent_transport(bad).expect_err(bad);
            assert!(err.to_string().contains(AGENT_CMDLINE_KEY), "{bad}: {err}");
        }
    }

    #[test]
    fn halt_flag_is_a_whole_word() {
        assert!(halt_by_reboot("console=ttyS0 hearth.halt=reboot reboot=k"));
        assert!(!halt_by_reboot("console=ttyS0 reboot=k"));
        assert!(!halt_by_reboot("hearth.halt=rebootx"));
    }
}
