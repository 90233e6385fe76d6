//! Transmit planning for MANA: which OOB bits and SGEs a frame needs (checksum offload, LSO
//! with the header SGE rule), reusing the frame classification of [`crate::offload`].
//!
//! LSO facts (OpenVMM `gdma` emulator, `bnic.rs`; Linux `mana_en.c` read for facts): the WQE
//! sets "client OOB in SGL" and carries the MSS in its client-unit-data field; the first SGE
//! holds exactly the headers (Ethernet + IP + TCP, at most 256 bytes) and the payload follows
//! in further SGEs. As for other NICs, the IPv4 total length / IPv6 payload length are zeroed
//! and the TCP checksum field holds the pseudo-header sum without the length, which the device
//! completes per segment; the IPv4 header checksum is recomputed by the device per segment.

use net_device::TxMeta;
use net_device::checksum::{add, fold};

use super::defs::TxShortOob;
use crate::offload::{self, Layout, Request, Transport};

/// Most header bytes the device takes in the first SGE of an LSO WQE.
pub(crate) const MAX_LSO_HEADERS: usize = 256;
/// Largest MSS the WQE's 14-bit client-unit-data field carries.
pub(crate) const MAX_LSO_MSS: u16 = 0x3fff;
/// Largest transport offset the short OOB's 10-bit field carries.
const MAX_TRANSPORT_OFFSET: usize = 0x3ff;

/// What the WQE for one frame looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TxPlan {
    /// Offload bits (CQ id and vPort offset are the caller's).
    pub oob: TxShortOob,
    /// `Some((headers_len, mss))` for LSO: two SGEs, split after the headers.
    pub lso: Option<(usize, u16)>,
    /// What happened, for the counters.
    pub kind: TxKind,
}

/// How a frame is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxKind {
    /// As written.
    Plain,
    /// The device inserts the L4 checksum.
    Checksum,
    /// The driver completed the checksum.
    SoftwareChecksum,
    /// The device segments the frame.
    Segmentation,
    /// Cannot be sent (malformed request, or an oversized frame that cannot be segmented).
    Refused,
}

fn checksum_oob(layout: &Layout) -> Option<TxShortOob> {
    let start = layout.start();
    if start > MAX_TRANSPORT_OFFSET {
        return None;
    }
    Some(TxShortOob {
        ipv4: layout.ipv4,
        ipv6: !layout.ipv4,
        tcp_checksum: layout.transport == Transport::Tcp,
        udp_checksum: layout.transport == Transport::Udp,
        transport_offset: start as u16,
        ..TxShortOob::default()
    })
}

/// Plans `frame` (already written) with the stack's `meta`; may rewrite headers (LSO) or
/// complete a checksum in software. `max_frame` is the largest frame without segmentation.
pub(crate) fn plan(frame: &mut [u8], meta: TxMeta, max_frame: usize, offloads: bool) -> TxPlan {
    let refused = TxPlan {
        oob: TxShortOob::default(),
        lso: None,
        kind: TxKind::Refused,
    };
    let plain = |kind| TxPlan {
        oob: TxShortOob::default(),
        lso: None,
        kind,
    };
    let classified = offload::classify(frame, meta, max_frame);
    match classified.request {
        Request::Plain => plain(TxKind::Plain),
        Request::Refuse(_) => refused,
        Request::Software(software) => {
            offload::complete_checksum(frame, software);
            plain(TxKind::SoftwareChecksum)
        }
        Request::Checksum(layout) if offloads => match checksum_oob(&layout) {
            Some(oob) => TxPlan {
                oob,
                lso: None,
                kind: TxKind::Checksum,
            },
            None => software_checksum(frame, &layout),
        },
        Request::Checksum(layout) => software_checksum(frame, &layout),
        Request::Segment(segmentation) => {
            let layout = segmentation.layout;
            let Some(mut oob) = checksum_oob(&layout) else {
                return refused;
            };
            if !offloads
                || segmentation.headers_len > MAX_LSO_HEADERS
                || segmentation.mss > MAX_LSO_MSS
            {
                return refused;
            }
            prepare_lso_headers(frame, &layout);
            oob.ip_checksum = layout.ipv4;
            TxPlan {
                oob,
                lso: Some((segmentation.headers_len, segmentation.mss)),
                kind: TxKind::Segmentation,
            }
        }
    }
}

fn software_checksum(frame: &mut [u8], layout: &Layout) -> TxPlan {
    let start = layout.start();
    let offset = match layout.transport {
        Transport::Tcp => 16,
        Transport::Udp => 6,
    };
    offload::complete_checksum(
        frame,
        offload::SoftwareChecksum {
            start,
            offset,
            end: frame.len(),
            udp: layout.transport == Transport::Udp,
        },
    );
    TxPlan {
        oob: TxShortOob::default(),
        lso: None,
        kind: TxKind::SoftwareChecksum,
    }
}

/// Rewrites the headers of an LSO frame the way the device wants them (module docs).
fn prepare_lso_headers(frame: &mut [u8], layout: &Layout) {
    let ip = layout.mac_len;
    let start = layout.start();
    let l4_len = frame.len() - start;
    if layout.ipv4 {
        frame[ip + 2..ip + 4].fill(0);
        frame[ip + 10..ip + 12].fill(0);
    } else {
        frame[ip + 4..ip + 6].fill(0);
    }
    // The field holds the folded pseudo-header sum including the L4 length; take the length
    // out again (one's-complement subtraction = adding its complement).
    let field = start + 16;
    let sum = u16::from_be_bytes([frame[field], frame[field + 1]]);
    let without_length = fold(add(u64::from(sum), &(!(l4_len as u16)).to_be_bytes()));
    frame[field..field + 2].copy_from_slice(&without_length.to_be_bytes());
}
