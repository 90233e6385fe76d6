//! Target `lab-pf`: the lab PF's side of the mailbox — VFs that write any words and any
//! control bits, reset themselves at any moment, while the PF's own register reads may answer
//! fuzzer data — then a real VF driver must still come up against the same lab PF.

use std::cell::RefCell;
use std::rc::Rc;

use net_device::{MacAddress, NetDevice, RegisterIo};
use vf_driver::fake::{FakeIgb, FakePfRegisters, FakeSriov, TestHost};
use vf_driver::fake_dma::FakeDmaAllocator;
use vf_driver::mailbox;
use vf_driver::regs::{self, Mailbox};
use vf_driver::{Config, IgbVf, LabPf, LabPfConfig};

use crate::engine::{Input, Outcome, Steps, Target, check, monotonic};
use crate::hostile::{Hostile, Script};

const MAX_OPERATIONS: usize = 64;
const VFS: u16 = 2;
const VF0_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x00, 0x0a, 0x00]);

type Lab = LabPf<Hostile<FakePfRegisters>, FakeSriov>;

fn counters(lab: &Lab) -> [(&'static str, u64); 9] {
    let c = lab.counters();
    [
        ("requests", c.requests),
        ("acks_sent", c.acks_sent),
        ("nacks_sent", c.nacks_sent),
        ("vf_resets", c.vf_resets),
        ("function_resets", c.function_resets),
        ("control_messages", c.control_messages),
        ("link_changes", c.link_changes),
        ("deferred_messages", c.deferred_messages),
        ("unknown_requests", c.unknown_requests),
    ]
}

fn run(input: &mut Input, steps: &mut Steps) -> Outcome {
    let fake = FakeIgb::new();
    let rate = input.u8();
    let script = Script::new(input.bytes(128), 0);
    let config = LabPfConfig {
        num_vfs: VFS,
        vf_macs: vec![Some(VF0_MAC)],
        ..LabPfConfig::default()
    };
    let Ok(lab) = LabPf::new(
        Hostile::new(fake.pf_registers(), &script),
        fake.sriov(),
        config,
    ) else {
        return Err("the lab rejected its own configuration".to_string());
    };
    let lab = Rc::new(RefCell::new(lab));
    if lab
        .borrow_mut()
        .bring_up(&mut TestHost::new(1_000))
        .is_err()
    {
        return Err("the lab PF did not come up on an honest device".to_string());
    }
    script.borrow_mut().set_rate(rate);
    let mut before = counters(&lab.borrow());
    for _ in 0..MAX_OPERATIONS {
        if input.is_empty() {
            break;
        }
        let vf = input.below(usize::from(VFS));
        let window = fake.vf_registers(vf);
        let operation = input.below(8);
        if crate::engine::tracing() {
            eprintln!(
                "vf {vf} op {operation}: P2VMAILBOX0 {:#x}",
                fake.pf_register(vf_driver::pf_regs::p2v_mailbox(0))
            );
        }
        match operation {
            0 | 1 => {
                // A whole request, the way a VF driver sends one, with any words.
                window.write32(regs::V2PMAILBOX, Mailbox::VFU.bits());
                let count = 1 + input.below(regs::MAILBOX_WORDS);
                let first = match input.below(8) {
                    0 => mailbox::VF_RESET,
                    1 => mailbox::SET_MAC_ADDR | (input.u32() & mailbox::MSGINFO_MASK),
                    2 => {
                        mailbox::SET_MULTICAST | (input.below(40) as u32) << mailbox::MSGINFO_SHIFT
                    }
                    3 => mailbox::SET_LPE,
                    4 => mailbox::SET_PROMISC | (input.u32() & mailbox::MSGINFO_MASK),
                    5 => mailbox::SET_VLAN,
                    _ => input.u32(),
                };
                window.write32(regs::VMBMEM, first);
                for index in 1..count {
                    window.write32(regs::VMBMEM + 4 * index, input.u32());
                }
                window.write32(regs::V2PMAILBOX, Mailbox::REQ.bits());
            }
            2 => window.write32(regs::V2PMAILBOX, input.u32() & 0xff),
            3 => window.write32(
                regs::VMBMEM + 4 * input.below(regs::MAILBOX_WORDS),
                input.u32(),
            ),
            4 => {
                let _ = window.read32(regs::V2PMAILBOX);
            }
            5 => match input.below(4) {
                0 => {
                    let _ = lab.borrow_mut().set_vf_link(vf as u16, input.bool());
                }
                1 => {
                    let _ = lab.borrow_mut().send_control_message(input.below(4) as u16);
                }
                2 => {
                    let _ = lab.borrow_mut().reset_vf_function(input.below(4) as u16);
                }
                _ => window.write32(regs::CTRL, input.u32()),
            },
            _ => lab.borrow_mut().service(),
        }
        steps.count(1)?;
        steps.observe(script.borrow().reads())?;
        let now = counters(&lab.borrow());
        monotonic("lab PF", &before, &now)?;
        before = now;
    }
    // An honest VF driver on VF 0 still comes up against the same lab PF, unless the PF's
    // registers read as a removed device's meanwhile (then the lab stops for good, by design).
    script.borrow_mut().stop();
    lab.borrow_mut().service();
    if !lab.borrow().is_present() {
        return Ok(());
    }
    let serviced = Rc::clone(&lab);
    let host = TestHost::new(1_000).with_idle(move || serviced.borrow_mut().service());
    let config = Config {
        rx_ring_size: 16,
        tx_ring_size: 16,
        mailbox_timeout_ns: 5_000_000,
        ..Config::default()
    };
    let vf = IgbVf::new(
        fake.vf_registers(0),
        FakeDmaAllocator::new(),
        Box::new(host),
        config,
    );
    steps.observe(script.borrow().reads())?;
    match vf {
        Ok(vf) => check(vf.mac_address() == VF0_MAC, || {
            format!("VF 0 got {} instead of {VF0_MAC}", vf.mac_address())
        }),
        Err(error) => Err(format!(
            "an honest VF could not start after hostile VFs: {error} (P2VMAILBOX0 {:#x})",
            fake.pf_register(vf_driver::pf_regs::p2v_mailbox(0))
        )),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut bytes = vec![0, 0];
    // VF 1: VF_RESET, then SET_MULTICAST with 3 hashes, SET_LPE 1518, service in between.
    bytes.extend_from_slice(&[1, 0, 0, 0, 7]);
    bytes.extend_from_slice(&[
        1, 0, 3, 2, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 7,
    ]);
    bytes.extend_from_slice(&[1, 0, 1, 3, 0xee, 5, 0, 0, 7]);
    bytes.extend_from_slice(&[1, 2, 2, 0, 0, 0, 7, 1, 4, 7]);
    let mut hostile = vec![128, 64];
    hostile.extend((0..64u32).map(|i| (i * 29) as u8));
    hostile.extend_from_slice(&bytes[2..]);
    vec![bytes, hostile]
}

/// The registration.
pub const TARGET: Target = Target {
    name: "lab-pf",
    about: "lab PF mailbox side vs hostile VFs and PF registers; an honest VF still comes up",
    default_cases: 50_000,
    max_input_len: 2048,
    memory_bound: 1024 * 1024,
    // Bring-up and the honest VF's start are bounded waits on the test clock (link and
    // mailbox timeouts of a few ms at a read or two per microsecond).
    step_bound: 200_000,
    seeds,
    run,
};
