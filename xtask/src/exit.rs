//! Translation of QEMU's exit status into the guest's exit code (isa-debug-exit convention).
//!
//! The guest writes a code `c` to the isa-debug-exit port (0xf4) and QEMU exits with status
//! `2c + 1`. So every odd status carries a guest code; an even status (including 0, which is what
//! QEMU returns after a reset or triple fault under `-no-reboot`) or a signal means the guest
//! never reported a code.

use std::fmt;
use std::process::ExitStatus;

/// Guest exit code the kernel uses when it panics.
pub const GUEST_PANIC: u8 = 101;
/// Guest exit code the kernel uses after a fatal CPU exception.
pub const GUEST_CPU_EXCEPTION: u8 = 102;

/// How a QEMU process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuExit {
    /// The guest wrote this code to isa-debug-exit.
    Guest(u8),
    /// QEMU exited with an even status: the guest did not report a code.
    QemuStatus(i32),
    /// QEMU was killed by this signal.
    Signal(i32),
}

impl QemuExit {
    /// Classifies a raw exit code / terminating signal pair.
    pub fn from_parts(code: Option<i32>, signal: Option<i32>) -> Self {
        match (code, signal) {
            (Some(code), _) if code % 2 == 1 => match u8::try_from((code - 1) / 2) {
                Ok(guest) => QemuExit::Guest(guest),
                Err(_) => QemuExit::QemuStatus(code),
            },
            (Some(code), _) => QemuExit::QemuStatus(code),
            (None, Some(signal)) => QemuExit::Signal(signal),
            // Neither code nor signal does not happen on Unix; report it as an odd QEMU status.
            (None, None) => QemuExit::QemuStatus(-1),
        }
    }

    /// Classifies a finished process's status.
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self::from_parts(status.code(), status.signal())
    }

    /// The exit code `cargo xtask run` itself returns: the guest code, 255 when QEMU failed,
    /// 128 + signal when it was killed (neither collides with a guest code, which is ≤ 127).
    pub fn process_exit_code(self) -> i32 {
        match self {
            QemuExit::Guest(code) => i32::from(code),
            QemuExit::QemuStatus(_) => 255,
            QemuExit::Signal(signal) => 128 + signal,
        }
    }
}

impl fmt::Display for QemuExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QemuExit::Guest(0) => write!(f, "guest exited with code 0 (success)"),
            QemuExit::Guest(GUEST_PANIC) => {
                write!(f, "guest exited with code {GUEST_PANIC} (kernel panic)")
            }
            QemuExit::Guest(GUEST_CPU_EXCEPTION) => write!(
                f,
                "guest exited with code {GUEST_CPU_EXCEPTION} (fatal CPU exception)"
            ),
            QemuExit::Guest(code) => write!(f, "guest exited with code {code}"),
            QemuExit::QemuStatus(0) => write!(
                f,
                "QEMU exited with status 0 without a guest exit code \
                 (guest reset, shut down or triple-faulted under -no-reboot)"
            ),
            QemuExit::QemuStatus(status) => write!(
                f,
                "QEMU itself failed with status {status} (no guest exit code)"
            ),
            QemuExit::Signal(signal) => write!(f, "QEMU was killed by signal {signal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_statuses_carry_the_guest_code() {
        assert_eq!(QemuExit::from_parts(Some(1), None), QemuExit::Guest(0));
        assert_eq!(QemuExit::from_parts(Some(3), None), QemuExit::Guest(1));
        assert_eq!(QemuExit::from_parts(Some(203), None), QemuExit::Guest(101));
        assert_eq!(QemuExit::from_parts(Some(205), None), QemuExit::Guest(102));
        assert_eq!(QemuExit::from_parts(Some(255), None), QemuExit::Guest(127));
    }

    #[test]
    fn even_statuses_and_signals_mean_qemu_failed() {
        assert_eq!(QemuExit::from_parts(Some(0), None), QemuExit::QemuStatus(0));
        assert_eq!(QemuExit::from_parts(Some(2), None), QemuExit::QemuStatus(2));
        assert_eq!(QemuExit::from_parts(None, Some(9)), QemuExit::Signal(9));
    }

    #[test]
    fn process_exit_codes_never_collide_with_guest_codes() {
        assert_eq!(QemuExit::Guest(0).process_exit_code(), 0);
        assert_eq!(QemuExit::Guest(101).process_exit_code(), 101);
        assert_eq!(QemuExit::QemuStatus(0).process_exit_code(), 255);
        assert_eq!(QemuExit::Signal(2).process_exit_code(), 130);
    }

    #[test]
    fn descriptions_name_the_kernel_conventions() {
        assert!(QemuExit::Guest(101).to_string().contains("panic"));
        assert!(QemuExit::Guest(102).to_string().contains("CPU exception"));
        assert!(
            QemuExit::QemuStatus(0)
                .to_string()
                .contains("without a guest exit code")
        );
    }
}
