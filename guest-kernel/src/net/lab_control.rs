//! The lab control channel: line commands on COM2 with which a test host injects VF events
//! (`cargo xtask vf ...` sends them) and reads the stack's counters.
//!
//! Commands: `vf disable`, `vf enable`, `vf link-down`, `vf link-up`, `vf reset` (PF control
//! message), `stats`. Every command is answered with one line starting `ok` or `error`.

use alloc::format;
use alloc::string::String;

use net_stack::NetStack;

use super::vf_path;
use crate::console;

/// Longest command line accepted; longer input is discarded up to the next newline.
const MAX_COMMAND: usize = 64;

/// Reads commands from COM2.
pub struct LabControl {
    line: String,
    overflow: bool,
}

impl LabControl {
    /// Opens the channel; `None` when the VM has no second serial port.
    pub fn open() -> Option<LabControl> {
        console::init_control_port().then(|| LabControl {
            line: String::new(),
            overflow: false,
        })
    }

    /// Executes every complete command waiting on the port.
    pub fn service(&mut self, stack: &mut NetStack) {
        while let Some(byte) = console::read_control_byte() {
            match byte {
                b'\n' | b'\r' => {
                    if !self.overflow && !self.line.trim().is_empty() {
                        let command = core::mem::take(&mut self.line);
                        let answer = execute(command.trim(), stack);
                        log::info!("lab control: {} -> {answer}", command.trim());
                        console::write_control_line(&answer);
                    }
                    self.line.clear();
                    self.overflow = false;
                }
                byte if self.line.len() < MAX_COMMAND
                    && byte.is_ascii()
                    && !byte.is_ascii_control() =>
                {
                    self.line.push(char::from(byte));
                }
                _ => self.overflow = true,
            }
        }
    }
}

fn execute(command: &str, stack: &mut NetStack) -> String {
    match command {
        "stats" => stats_line(stack),
        "vf disable" => vf_path::lab_event(vf_path::LabEvent::DisableVfs, stack),
        "vf enable" => vf_path::lab_event(vf_path::LabEvent::EnableVfs, stack),
        "vf link-down" => vf_path::lab_event(vf_path::LabEvent::LinkDown, stack),
        "vf link-up" => vf_path::lab_event(vf_path::LabEvent::LinkUp, stack),
        "vf reset" => vf_path::lab_event(vf_path::LabEvent::ControlMessage, stack),
        other => format!("error unknown command {other:?}"),
    }
}

/// One line with the counters tests and users look at.
pub fn stats_line(stack: &NetStack) -> String {
    let stats = stack.stats();
    let bond = &stats.bond;
    let vf = bond.vf.as_ref();
    format!(
        "ok active={:?} rx_frames={} tx_frames={} synthetic_rx={} synthetic_tx={} vf_rx={} vf_tx={} \
         switches_to_vf={} switches_to_synthetic={} duplicates_dropped={} bad_frames_dropped={} \
         tcp_accepted={} vf_hardware_rx={} vf_hardware_tx={} vf_driver_rx={} vf_driver_tx={} \
         synthetic_hardware_rx={} synthetic_hardware_tx={} synthetic_driver_rx={} synthetic_driver_tx={} \
         synthetic_tx_tso={} synthetic_tx_soft_segmented={} vf_tx_tso={} vf_tx_soft_segmented={} \
         rx_segments_merged={} rx_merged_frames={} rx_merge_refused_flags={} \
         rx_merge_refused_no_payload={} rx_merge_refused_out_of_order={} \
         rx_merge_refused_ip_options={} rx_merge_refused_header={} rx_merge_refused_tcp_options={} \
         rx_merge_refused_size={} rx_merge_refused_memory={} rx_merge_refused_malformed={} \
         rx_receive_ns={}",
        bond.active,
        bond.total.bond.rx_frames,
        bond.total.bond.tx_frames,
        bond.synthetic.bond.rx_frames,
        bond.synthetic.bond.tx_frames,
        vf.map_or(0, |vf| vf.bond.rx_frames) + bond.vf_retired.bond.rx_frames,
        vf.map_or(0, |vf| vf.bond.tx_frames) + bond.vf_retired.bond.tx_frames,
        bond.switches_to_vf,
        bond.switches_to_synthetic,
        bond.duplicates_dropped,
        bond.bad_frames_dropped,
        stats.tcp_accepted,
        vf.map_or(0, |vf| vf.device.hardware_rx_frames) + bond.vf_retired.device.hardware_rx_frames,
        vf.map_or(0, |vf| vf.device.hardware_tx_frames) + bond.vf_retired.device.hardware_tx_frames,
        vf.map_or(0, |vf| vf.device.rx_frames) + bond.vf_retired.device.rx_frames,
        vf.map_or(0, |vf| vf.device.tx_frames) + bond.vf_retired.device.tx_frames,
        bond.synthetic.device.hardware_rx_frames,
        bond.synthetic.device.hardware_tx_frames,
        bond.synthetic.device.rx_frames,
        bond.synthetic.device.tx_frames,
        bond.synthetic.bond.tx_offloaded_segmentation,
        bond.synthetic.bond.tx_software_segmentation,
        vf.map_or(0, |vf| vf.bond.tx_offloaded_segmentation)
            + bond.vf_retired.bond.tx_offloaded_segmentation,
        vf.map_or(0, |vf| vf.bond.tx_software_segmentation)
            + bond.vf_retired.bond.tx_software_segmentation,
        bond.coalesce.segments_merged,
        bond.coalesce.merged_frames,
        bond.coalesce.refused_flags,
        bond.coalesce.refused_no_payload,
        bond.coalesce.refused_out_of_order,
        bond.coalesce.refused_ip_options,
        bond.coalesce.refused_header_mismatch,
        bond.coalesce.refused_tcp_options,
        bond.coalesce.refused_size,
        bond.coalesce.refused_memory,
        bond.coalesce.refused_malformed,
        stats.receive_ns,
    )
}
