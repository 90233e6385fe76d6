//! A hostile device: wraps a fake device model's register window so that reads answer with
//! fuzzer data while the script lasts (and the model's own answers after), counting every read.

use std::cell::RefCell;
use std::rc::Rc;

use net_device::RegisterIo;

/// The shared script of hostile answers.
#[derive(Default)]
pub struct Script {
    bytes: Vec<u8>,
    position: usize,
    reads: u64,
    /// Reads out of 256 that are tampered with while the script lasts.
    rate: u8,
}

impl Script {
    /// A script over `bytes`, tampering with about `rate`/256 of the reads.
    pub fn new(bytes: &[u8], rate: u8) -> Rc<RefCell<Script>> {
        Rc::new(RefCell::new(Script {
            bytes: bytes.to_vec(),
            position: 0,
            reads: 0,
            rate,
        }))
    }

    fn next_byte(&mut self) -> Option<u8> {
        let byte = self.bytes.get(self.position).copied();
        self.position += 1;
        byte
    }

    /// The answer to a read the model answered with `honest`.
    fn answer(&mut self, honest: u32) -> u32 {
        self.reads += 1;
        let Some(control) = self.next_byte() else {
            return honest;
        };
        if control >= self.rate {
            return honest;
        }
        let mut word = [0u8; 4];
        for byte in &mut word {
            *byte = self.next_byte().unwrap_or(0);
        }
        // Zero and all-ones (what a removed device reads) are rarer than lies that look alive.
        match control % 8 {
            0 => 0,
            1 => u32::MAX,
            2..=4 => honest ^ u32::from_le_bytes(word),
            _ => u32::from_le_bytes(word),
        }
    }

    /// Changes how many reads out of 256 are tampered with.
    pub fn set_rate(&mut self, rate: u8) {
        self.rate = rate;
    }

    /// Register reads so far (tampered or not).
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Ends the hostility: from now on every read is the model's.
    pub fn stop(&mut self) {
        self.position = self.bytes.len();
    }

    /// True while hostile answers are left.
    pub fn is_active(&self) -> bool {
        self.position < self.bytes.len()
    }
}

/// A register window whose reads a [`Script`] may replace.
pub struct Hostile<R> {
    inner: R,
    script: Rc<RefCell<Script>>,
}

impl<R> Hostile<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, script: &Rc<RefCell<Script>>) -> Self {
        Hostile {
            inner,
            script: Rc::clone(script),
        }
    }
}

impl<R: RegisterIo> RegisterIo for Hostile<R> {
    fn read32(&self, offset: usize) -> u32 {
        let honest = self.inner.read32(offset);
        self.script.borrow_mut().answer(honest)
    }

    fn write32(&self, offset: usize, value: u32) {
        self.inner.write32(offset, value);
    }

    fn read16(&self, offset: usize) -> u16 {
        let honest = self.inner.read16(offset);
        self.script.borrow_mut().answer(u32::from(honest)) as u16
    }

    fn write16(&self, offset: usize, value: u16) {
        self.inner.write16(offset, value);
    }

    fn read8(&self, offset: usize) -> u8 {
        let honest = self.inner.read8(offset);
        self.script.borrow_mut().answer(u32::from(honest)) as u8
    }

    fn write8(&self, offset: usize, value: u8) {
        self.inner.write8(offset, value);
    }

    fn len(&self) -> usize {
        self.inner.len()
    }
}
