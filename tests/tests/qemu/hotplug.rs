//! PCIe native hot-plug with `hello.stay=1`: an e1000e added to and removed from `rp2`, twice.

use serde_json::json;
use tandem_tests::{BOOT_TIMEOUT, HOTPLUG_TIMEOUT, accelerators, hotplug_bar_address, image};
use xtask::QemuBuilder;
use xtask::machine::SPARE_ROOT_PORT;

/// 82574L (e1000e), a single-function PCIe NIC that QEMU can hot-plug.
const E1000E: &str = "8086:10d3";

#[test]
fn e1000e_is_hot_added_and_removed_twice() {
    for accel in accelerators() {
        let mut qemu = QemuBuilder::new(format!("hotplug {accel}"), accel)
            .kernel(image("hello"))
            .cmdline("hello.stay=1")
            .netdev("user,id=hpnet")
            .spawn()
            .unwrap_or_else(|error| panic!("{error}"));
        qemu.wait_for_line("hello: waiting for hot-plug events", BOOT_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}"));
        for cycle in 1..=2 {
            qemu.qmp()
                .and_then(|qmp| {
                    qmp.execute(
                        "device_add",
                        Some(json!({
                            "driver": "e1000e", "id": "hp0", "bus": SPARE_ROOT_PORT, "netdev": "hpnet"
                        })),
                    )
                })
                .unwrap_or_else(|error| panic!("cycle {cycle}: {error}"));
            let arrived = qemu
                .wait_for_line("device arrived", HOTPLUG_TIMEOUT)
                .unwrap_or_else(|error| panic!("cycle {cycle}: {error}"));
            assert!(arrived.contains(E1000E), "cycle {cycle}: {arrived}");
            assert!(
                hotplug_bar_address(&arrived).is_some_and(|address| address != 0),
                "cycle {cycle}: no BAR with a non-zero address in {arrived:?}"
            );

            qemu.qmp()
                .and_then(|qmp| qmp.execute("device_del", Some(json!({"id": "hp0"}))))
                .unwrap_or_else(|error| panic!("cycle {cycle}: {error}"));
            qemu.wait_for_line("device leaving", HOTPLUG_TIMEOUT)
                .unwrap_or_else(|error| panic!("cycle {cycle}: {error}"));
            let deleted = qemu.qmp().and_then(|qmp| {
                qmp.wait_event_where("DEVICE_DELETED", HOTPLUG_TIMEOUT, |data| {
                    data["device"] == "hp0"
                })
            });
            if let Err(error) = deleted {
                panic!("cycle {cycle}: {error}\n{}", qemu.diagnostics());
            }
            qemu.wait_for_line("unplug complete", HOTPLUG_TIMEOUT)
                .unwrap_or_else(|error| panic!("cycle {cycle}: {error}"));
        }
    }
}
