//! Target `mana`: the MANA driver's handling of device-written memory through the entry points
//! its author left (`vf_driver::mana::fuzz`): raw EQ/CQ entries with right or forged owner
//! counts between receive/poll/transmit rounds, and forged HWC responses to bring-up and
//! teardown requests. The entry points check no panic and bounded waits (the driver's own
//! iteration bound and a 1 µs-per-look clock); they expose no counters to compare.

use vf_driver::mana::fuzz::{data_path_entries, hwc_responses};

use crate::engine::{Input, Outcome, Steps, Target};

/// Bytes one data-path step takes (a control byte and a 64-byte entry).
const ENTRY_STEP: usize = 65;

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let hwc = input.below(4) == 0;
    let bytes = input.rest();
    if hwc {
        // Each forged response takes at least one byte.
        steps.count(bytes.len() as u64)?;
        hwc_responses(bytes);
    } else {
        steps.count(bytes.len().div_ceil(ENTRY_STEP) as u64)?;
        data_path_entries(bytes);
    }
    Ok(())
}

fn seeds() -> Vec<Vec<u8>> {
    // Data path: an RX CQ entry with the right owner count, then a TX CQ one, then an EQ one.
    let mut data_path = vec![1u8];
    for control in [0x00u8, 0x01, 0x06] {
        data_path.push(control);
        let mut entry = vec![0u8; 64];
        entry[0] = 1;
        entry[60] = 1;
        data_path.extend_from_slice(&entry);
    }
    // HWC: three forged responses of 4, 8 and 16 words.
    let mut hwc = vec![0u8];
    for words in [4u8, 8, 16] {
        hwc.push(words);
        hwc.extend((0..words as usize * 4).map(|byte| byte as u8));
    }
    vec![data_path, hwc]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "mana",
    about: "MANA driver: raw EQ/CQ entries (right or forged owner counts) and forged HWC responses",
    default_cases: 20_000,
    max_input_len: 2048,
    memory_bound: 4 << 20,
    step_bound: 2048,
    seeds,
    run,
};
