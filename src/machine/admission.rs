//! Admission: whether the host has room for one more machine, and how much room it has.
//! Pure arithmetic over figures the callers read (the store's live table, the host's
//! size, the data dir's free space), so every rule is a row in the tables below; the
//! store applies [`admit`] inside its create transaction, the API [`disk_room`] before it.
//! The limits themselves are `[capacity]` in the daemon's config ([`CapacityConfig`]).

use serde::Deserialize;

use super::spec::MachineSpec;

/// Node-wide room, for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// vCPUs the host admits in total.
    pub vcpus: u32,
    /// MiB the host admits in total.
    pub memory_mib: u64,
    /// Address blocks in the pool: every machine not destroyed holds or will hold one.
    pub slots: u32,
}

/// What machines not destroyed hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of vCPUs.
    pub vcpus: u32,
    /// Sum of MiB.
    pub memory_mib: u64,
    /// Count of machines.
    pub machines: u32,
}

impl Usage {
    /// Counts one more machine of `vcpus` and `memory_mib`.
    pub fn add(&mut self, vcpus: u32, memory_mib: u64) {
        self.vcpus = self.vcpus.saturating_add(vcpus);
        self.memory_mib = self.memory_mib.saturating_add(memory_mib);
        self.machines = self.machines.saturating_add(1);
    }
}

/// The host's size, as probed (see `crate::host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSize {
    /// CPU cores this process may run on.
    pub cores: u32,
    /// Total memory, MiB (0: unknown).
    pub memory_mib: u64,
}

/// vCPUs admitted per core when `capacity.vcpus` is 0.
pub const VCPUS_PER_CORE: u32 = 8;
/// MiB kept for the host when `capacity.memory_mib` is 0.
pub const HOST_KEEPS_MIB: u64 = 1024;
/// The least memory admitted when `capacity.memory_mib` is 0.
pub const MIN_ADMITTED_MIB: u64 = 256;

/// The vCPUs and MiB the host admits: `vcpus` and `memory_mib` as configured, or where
/// either is 0, derived from the host: [`VCPUS_PER_CORE`] per core; all memory but
/// [`HOST_KEEPS_MIB`], and at least [`MIN_ADMITTED_MIB`].
pub fn totals(vcpus: u32, memory_mib: u64, host: HostSize) -> (u32, u64) {
    let vcpus = match vcpus {
        0 => host.cores.max(1).saturating_mul(VCPUS_PER_CORE),
        n => n,
    };
    let memory_mib = match memory_mib {
        0 => host
            .memory_mib
            .saturating_sub(HOST_KEEPS_MIB)
            .max(MIN_ADMITTED_MIB),
        n => n,
    };
    (vcpus, memory_mib)
}

/// Refuses a new machine of `spec` the host has no room for beside `usage` (every
/// machine not destroyed counts, prepared capacity too): vCPUs, memory and an address
/// block. The error says what was asked and what is in use.
pub fn admit(usage: Usage, spec: &MachineSpec, room: Room) -> Result<(), String> {
    if usage.vcpus.saturating_add(spec.vcpus) > room.vcpus {
        return Err(format!(
            "{} vCPUs asked, {} of {} in use",
            spec.vcpus, usage.vcpus, room.vcpus
        ));
    }
    if usage.memory_mib.saturating_add(u64::from(spec.memory_mib)) > room.memory_mib {
        return Err(format!(
            "{} MiB asked, {} of {} MiB in use",
            spec.memory_mib, usage.memory_mib, room.memory_mib
        ));
    }
    if usage.machines >= room.slots {
        return Err(format!(
            "network.pool: all {} address blocks are held by machines not destroyed",
            room.slots
        ));
    }
    Ok(())
}

/// Refuses a root disk of up to `asked_mib` that would take the data dir's filesystem,
/// with `free_mib` free, below `keep_mib` (`capacity.min_free_mib`).
pub fn disk_room(free_mib: u64, asked_mib: u64, keep_mib: u64) -> Result<(), String> {
    if free_mib < asked_mib.saturating_add(keep_mib) {
        return Err(format!(
            "spec.disk_mib: {free_mib} MiB free on the data dir's filesystem; the root disk \
             asks up to {asked_mib} MiB and {keep_mib} MiB are kept free (capacity.min_free_mib)"
        ));
    }
    Ok(())
}

/// Admission limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// vCPUs all machines together may have; 0 means 8 per host core.
    pub vcpus: u32,
    /// MiB all machines together may have; 0 means the host's memory less 1 GiB.
    pub memory_mib: u64,
    /// Largest vCPU count one machine may ask for.
    pub max_vcpus_per_machine: u32,
    /// Largest memory one machine may ask for, in MiB.
    pub max_memory_mib_per_machine: u64,
    /// Smallest memory one machine may ask for, in MiB (the guest kernel panics below ~96).
    pub min_memory_mib_per_machine: u64,
    /// Space the data dir's filesystem keeps free, in MiB: a create whose root disk would
    /// take the free space below it is refused. Apart from `images.min_free_mib` because
    /// the two guard different things, often on different file systems: this one the
    /// machines' own disks, which grow while the machines run (a larger reserve); that one
    /// the image cache's one-off pulls and builds, on the cache dir's file system.
    pub min_free_mib: u64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            vcpus: 0,
            memory_mib: 0,
            max_vcpus_per_machine: 8,
            max_memory_mib_per_machine: 16 * 1024,
            min_memory_mib_per_machine: 96,
            min_free_mib: 512,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vcpus: u32, memory_mib: u32) -> MachineSpec {
        MachineSpec {
            vcpus,
            memory_mib,
            ..MachineSpec::default()
        }
    }

    const ROOM: Room = Room {
        vcpus: 4,
        memory_mib: 1024,
        slots: 3,
    };

    #[test]
    fn admits_what_fits_and_names_what_does_not() {
        let used = |vcpus, memory_mib, machines| Usage {
            vcpus,
            memory_mib,
            machines,
        };
        let rows: Vec<(Usage, MachineSpec, Option<&str>)> = vec![
            (Usage::default(), spec(4, 1024), None),
            (used(3, 0, 1), spec(1, 128), None),
            (
                used(3, 0, 1),
                spec(2, 128),
                Some("2 vCPUs asked, 3 of 4 in use"),
            ),
            (used(0, 900, 1), spec(1, 124), None),
            (
                used(0, 900, 1),
                spec(1, 125),
                Some("125 MiB asked, 900 of 1024 MiB in use"),
            ),
            (
                used(1, 128, 3),
                spec(1, 128),
                Some("network.pool: all 3 address blocks are held by machines not destroyed"),
            ),
            // Sums that would overflow are refused, not wrapped.
            (used(u32::MAX, 0, 0), spec(1, 128), Some("1 vCPUs asked")),
        ];
        for (usage, spec, refused) in rows {
            let got = admit(usage, &spec, ROOM);
            match refused {
                None => assert_eq!(got, Ok(()), "{usage:?} {spec:?}"),
                Some(why) => {
                    let e = got.expect_err("refused");
                    assert!(e.starts_with(why), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_disk_keeps_the_configured_free_space() {
        assert_eq!(disk_room(2048, 1024, 1024), Ok(()));
        let e = disk_room(2047, 1024, 1024).expect_err("refused");
        assert!(e.starts_with("spec.disk_mib: 2047 MiB free"), "{e}");
        assert!(e.contains("capacity.min_free_mib"), "{e}");
        assert_eq!(disk_room(0, 0, 0), Ok(()));
        assert!(disk_room(u64::MAX, u64::MAX, 1).is_ok());
    }

    #[test]
    fn totals_come_from_the_config_or_the_host() {
        let host = HostSize {
            cores: 2,
            memory_mib: 8192,
        };
        let rows = [
            ((0, 0), host, (16, 7168)),
            ((3, 500), host, (3, 500)),
            // A small or unreadable host still admits the minimum.
            (
                (0, 0),
                HostSize {
                    cores: 0,
                    memory_mib: 0,
                },
                (VCPUS_PER_CORE, MIN_ADMITTED_MIB),
            ),
            (
                (0, 0),
                HostSize {
                    cores: 1,
                    memory_mib: 1100,
                },
                (8, 256),
            ),
        ];
        for ((vcpus, memory), host, want) in rows {
            assert_eq!(totals(vcpus, memory, host), want, "{host:?}");
        }
    }
}
