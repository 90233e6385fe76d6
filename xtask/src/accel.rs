//! Choice of QEMU accelerator: KVM only where it really works, TCG otherwise.
//!
//! KVM is used only when `/dev/kvm` can be opened, the CPU advertises hardware virtualisation
//! (`vmx` or `svm` in /proc/cpuinfo) and the host KVM is not `kvm_pvm`: under that module
//! (a paravirtualised KVM for hosts that are themselves VMs without nested virtualisation)
//! our guests crawl or hang, so TCG is the better choice there.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// The value for QEMU's `-accel` option.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

impl FromStr for Accel {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        match text {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(Error::Usage(format!(
                "unknown accelerator `{other}` (expected kvm or tcg)"
            ))),
        }
    }
}

/// The accelerator chosen and why, so the user can see the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator to use.
    pub accel: Accel,
    /// A short human-readable reason.
    pub reason: String,
}

/// What the host says about /dev/kvm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmDevice {
    /// /dev/kvm does not exist.
    Missing,
    /// /dev/kvm exists but cannot be opened read-write.
    NoAccess,
    /// /dev/kvm opens read-write.
    Usable,
}

/// Host facts the decision is made from (gathered by [`HostFacts::probe`], faked in tests).
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// State of /dev/kvm.
    pub kvm_device: KvmDevice,
    /// Contents of /proc/cpuinfo.
    pub cpuinfo: String,
    /// Contents of /proc/modules, if readable.
    pub modules: Option<String>,
    /// Whether /sys/module/kvm_pvm exists (covers hosts where /proc/modules is hidden).
    pub kvm_pvm_in_sysfs: bool,
}

impl HostFacts {
    /// Reads the facts from this host.
    pub fn probe() -> Self {
        let kvm_device = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => KvmDevice::Usable,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => KvmDevice::Missing,
            Err(_) => KvmDevice::NoAccess,
        };
        HostFacts {
            kvm_device,
            cpuinfo: std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            modules: std::fs::read_to_string("/proc/modules").ok(),
            kvm_pvm_in_sysfs: std::path::Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// True when a `flags` line of /proc/cpuinfo lists `vmx` (Intel VT-x) or `svm` (AMD-V).
pub fn cpu_has_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .filter_map(|line| line.split_once(':'))
        .any(|(_, flags)| {
            flags
                .split_whitespace()
                .any(|flag| flag == "vmx" || flag == "svm")
        })
}

/// True when /proc/modules lists the `kvm_pvm` module.
pub fn modules_have_kvm_pvm(modules: &str) -> bool {
    modules
        .lines()
        .any(|line| line.split_whitespace().next() == Some("kvm_pvm"))
}

/// Decides between KVM and TCG from the host facts.
pub fn choose_accel(facts: &HostFacts) -> AccelChoice {
    let tcg = |reason: &str| AccelChoice {
        accel: Accel::Tcg,
        reason: reason.to_string(),
    };
    match facts.kvm_device {
        KvmDevice::Missing => return tcg("/dev/kvm does not exist"),
        KvmDevice::NoAccess => return tcg("/dev/kvm cannot be opened read-write"),
        KvmDevice::Usable => {}
    }
    if !cpu_has_virtualisation(&facts.cpuinfo) {
        return tcg("the CPU flags in /proc/cpuinfo have neither vmx nor svm");
    }
    let pvm_loaded =
        facts.kvm_pvm_in_sysfs || facts.modules.as_deref().is_some_and(modules_have_kvm_pvm);
    if pvm_loaded {
        return tcg("the host KVM is kvm_pvm, under which guests crawl or hang");
    }
    AccelChoice {
        accel: Accel::Kvm,
        reason: "/dev/kvm is usable, the CPU has vmx/svm and kvm_pvm is not loaded".to_string(),
    }
}

/// Decides from this host's facts, or takes the user's override.
pub fn decide(overridden: Option<Accel>) -> AccelChoice {
    match overridden {
        Some(accel) => AccelChoice {
            accel,
            reason: "chosen with --accel".to_string(),
        },
        None => choose_accel(&HostFacts::probe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr vmx smx est\n";
    const NO_VIRT_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc hypervisor \
        vmx_ept_bits svm_lock\nbugs\t\t: vmx svm\n";
    const PVM_MODULES: &str = "kvm_pvm 45056 0 - Live 0x0000000000000000\n\
        kvm 1392640 1 kvm_pvm, Live 0x0000000000000000\n";
    const PLAIN_MODULES: &str =
        "kvm_intel 409600 0 - Live 0x0\nkvm 1392640 1 kvm_intel, Live 0x0\n";

    fn facts(kvm_device: KvmDevice, cpuinfo: &str, modules: Option<&str>) -> HostFacts {
        HostFacts {
            kvm_device,
            cpuinfo: cpuinfo.to_string(),
            modules: modules.map(str::to_string),
            kvm_pvm_in_sysfs: false,
        }
    }

    #[test]
    fn kvm_when_everything_is_real() {
        let choice = choose_accel(&facts(
            KvmDevice::Usable,
            INTEL_CPUINFO,
            Some(PLAIN_MODULES),
        ));
        assert_eq!(choice.accel, Accel::Kvm);
        let amd = "flags\t\t: fpu svm lm\n";
        assert_eq!(
            choose_accel(&facts(KvmDevice::Usable, amd, None)).accel,
            Accel::Kvm
        );
    }

    #[test]
    fn tcg_without_a_usable_dev_kvm() {
        let missing = choose_accel(&facts(KvmDevice::Missing, INTEL_CPUINFO, None));
        assert_eq!(missing.accel, Accel::Tcg);
        assert!(missing.reason.contains("does not exist"));
        let denied = choose_accel(&facts(KvmDevice::NoAccess, INTEL_CPUINFO, None));
        assert_eq!(denied.accel, Accel::Tcg);
    }

    #[test]
    fn tcg_when_flags_lack_vmx_and_svm_even_if_other_lines_mention_them() {
        let choice = choose_accel(&facts(
            KvmDevice::Usable,
            NO_VIRT_CPUINFO,
            Some(PLAIN_MODULES),
        ));
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("vmx"));
    }

    #[test]
    fn tcg_under_kvm_pvm() {
        let choice = choose_accel(&facts(KvmDevice::Usable, INTEL_CPUINFO, Some(PVM_MODULES)));
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("kvm_pvm"));
        let mut sysfs_only = facts(KvmDevice::Usable, INTEL_CPUINFO, None);
        sysfs_only.kvm_pvm_in_sysfs = true;
        assert_eq!(choose_accel(&sysfs_only).accel, Accel::Tcg);
    }

    #[test]
    fn override_wins() {
        assert_eq!(decide(Some(Accel::Kvm)).accel, Accel::Kvm);
        assert_eq!(decide(Some(Accel::Tcg)).accel, Accel::Tcg);
        assert!("qemu".parse::<Accel>().is_err());
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
    }
}
