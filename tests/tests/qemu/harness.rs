//! The harness itself against real QEMU, with a tiny boot-sector guest instead of the kernel.

use std::time::Duration;

use serde_json::json;
use tandem_tests::{BootSectorEnd, TempFile, boot_sector_disk};
use xtask::{Accel, Error, Qemu, QemuBuilder, QemuExit};

fn boot_sector_guest(label: &str, disk: &TempFile) -> QemuBuilder {
    QemuBuilder::new(label, Accel::Tcg)
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=ide,snapshot=on",
            disk.path().display()
        ))
}

fn spawn(builder: QemuBuilder) -> Qemu {
    builder.spawn().unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn serial_lines_and_the_guest_exit_code_are_captured() {
    let disk = TempFile::new(
        "exit5.img",
        &boot_sector_disk(
            "tandem harness check\nsecond line\n",
            BootSectorEnd::Exit(5),
        ),
    );
    let mut qemu = spawn(boot_sector_guest("harness exit", &disk));
    let first = qemu
        .wait_for_line("harness check", Duration::from_secs(60))
        .unwrap();
    assert_eq!(first, "tandem harness check");
    assert_eq!(
        qemu.wait_for_line("second", Duration::from_secs(60))
            .unwrap(),
        "second line"
    );
    assert_eq!(qemu.wait_exit(Duration::from_secs(60)).unwrap(), 5);
    // A line already matched is not matched again, and waiting on an ended guest fails at once.
    let error = qemu
        .wait_for_line("second", Duration::from_secs(60))
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::QemuExited {
                exit: QemuExit::Guest(5),
                ..
            }
        ),
        "{error}"
    );
    assert!(
        qemu.serial_text()
            .contains("tandem harness check\nsecond line")
    );
}

#[test]
fn a_silent_guest_times_out_and_is_killed_on_drop() {
    let disk = TempFile::new(
        "halt.img",
        &boot_sector_disk("halting\n", BootSectorEnd::Halt),
    );
    let mut qemu = spawn(boot_sector_guest("harness halt", &disk));
    qemu.wait_for_line("halting", Duration::from_secs(60))
        .unwrap();
    let error = qemu
        .wait_for_line("never printed", Duration::from_millis(500))
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    assert!(
        error.to_string().contains("halting"),
        "diagnostics lack the serial tail: {error}"
    );
    let pid = qemu.pid();
    let socket_dir = qemu.qmp_socket().parent().unwrap().to_path_buf();
    assert!(socket_dir.exists());
    drop(qemu);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!socket_dir.exists());
}

#[test]
fn qmp_hotplug_into_a_powered_off_slot_needs_no_guest() {
    // A root port empty at boot is powered off; QEMU then completes device_del by itself
    // (shared/reference/qemu-igb-sriov-hotplug.md §4.4).
    let disk = TempFile::new(
        "hp-off.img",
        &boot_sector_disk("ready\n", BootSectorEnd::Halt),
    );
    let mut qemu = spawn(boot_sector_guest("harness hotplug", &disk).netdev("user,id=hpnet"));
    qemu.wait_for_line("ready", Duration::from_secs(60))
        .unwrap();
    let qmp = qemu.qmp().unwrap();
    assert_eq!(
        qmp.version()["qemu"]["major"]
            .as_u64()
            .map(|major| major >= 10),
        Some(true)
    );
    for _ in 0..2 {
        qmp.execute(
            "device_add",
            Some(json!({"driver": "e1000e", "id": "hp0", "bus": "rp2", "netdev": "hpnet"})),
        )
        .unwrap();
        qmp.execute("device_del", Some(json!({"id": "hp0"})))
            .unwrap();
        let deleted = qmp
            .wait_event_where("DEVICE_DELETED", Duration::from_secs(30), |data| {
                data["device"] == "hp0"
            })
            .unwrap();
        assert_eq!(deleted["path"], "/machine/peripheral/hp0");
    }
    let error = qmp
        .execute("device_del", Some(json!({"id": "hp0"})))
        .unwrap_err();
    assert!(
        matches!(&error, Error::Qmp { class, .. } if class == "DeviceNotFound"),
        "{error}"
    );
}

#[test]
fn qmp_unplug_of_a_powered_slot_waits_for_the_guest() {
    let disk = TempFile::new(
        "hp-on.img",
        &boot_sector_disk("ready\n", BootSectorEnd::Halt),
    );
    let mut qemu = spawn(
        boot_sector_guest("harness unplug", &disk)
            .netdev("user,id=bootnet")
            .device("e1000e,id=boot0,bus=rp1,netdev=bootnet"),
    );
    qemu.wait_for_line("ready", Duration::from_secs(60))
        .unwrap();
    let qmp = qemu.qmp().unwrap();
    qmp.execute("device_del", Some(json!({"id": "boot0"})))
        .unwrap();
    let waited = qmp
        .wait_event_where("DEVICE_DELETED", Duration::from_secs(1), |data| {
            data["device"] == "boot0"
        })
        .unwrap_err();
    assert!(matches!(waited, Error::Timeout { .. }), "{waited}");
    // QEMU refuses a second request for 5 s while the first is pending (qdev-monitor.c).
    let again = qmp
        .execute("device_del", Some(json!({"id": "boot0"})))
        .unwrap_err();
    assert!(
        again.to_string().contains("in the process of unplug"),
        "{again}"
    );
    qmp.execute("quit", None).unwrap();
    // QEMU quitting is not a guest exit code.
    assert_eq!(
        qemu.wait_for_exit(Duration::from_secs(30)).unwrap(),
        QemuExit::QemuStatus(0)
    );
}
