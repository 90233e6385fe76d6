//! The serial console (16550 UART on COM1) and the `log` backend that writes to it.
//!
//! Each log line carries the monotonic time since boot and the level:
//! `[    0.012345] INFO  message`.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

use crate::arch::{cpu, port};

const COM1: u16 = 0x3f8;
/// Transmit holding register / divisor latch low.
const REG_DATA: u16 = 0;
/// Interrupt enable / divisor latch high.
const REG_INTERRUPT_ENABLE: u16 = 1;
/// FIFO control.
const REG_FIFO_CONTROL: u16 = 2;
/// Line control (bit 7 = divisor latch access).
const REG_LINE_CONTROL: u16 = 3;
/// Modem control.
const REG_MODEM_CONTROL: u16 = 4;
/// Line status (bit 5 = transmit holding register empty).
const REG_LINE_STATUS: u16 = 5;
const LINE_STATUS_THR_EMPTY: u8 = 1 << 5;

/// The UART; the lock serialises whole lines.
pub struct Serial {
    present: bool,
}

static SERIAL: Mutex<Serial> = Mutex::new(Serial { present: false });
static PANICKING: AtomicBool = AtomicBool::new(false);

impl Serial {
    fn init(&mut self) {
        // SAFETY: COM1's registers; 115200 8N1, FIFOs on, interrupts off.
        unsafe {
            port::outb(COM1 + REG_INTERRUPT_ENABLE, 0);
            port::outb(COM1 + REG_LINE_CONTROL, 0x80);
            port::outb(COM1 + REG_DATA, 1);
            port::outb(COM1 + REG_INTERRUPT_ENABLE, 0);
            port::outb(COM1 + REG_LINE_CONTROL, 0x03);
            port::outb(COM1 + REG_FIFO_CONTROL, 0xc7);
            port::outb(COM1 + REG_MODEM_CONTROL, 0x03);
            // A missing UART reads 0xff everywhere.
            self.present = port::inb(COM1 + REG_LINE_STATUS) != 0xff;
        }
    }

    fn write_byte(&mut self, byte: u8) {
        if !self.present {
            return;
        }
        // Bounded: a wedged UART must not hang the kernel.
        for _ in 0..100_000 {
            // SAFETY: reading COM1's line status has no side effects.
            if unsafe { port::inb(COM1 + REG_LINE_STATUS) } & LINE_STATUS_THR_EMPTY != 0 {
                break;
            }
        }
        // SAFETY: writing the transmit register sends one byte.
        unsafe { port::outb(COM1 + REG_DATA, byte) };
    }
}

impl Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(byte);
        }
        Ok(())
    }
}

/// Initialises COM1. Called first thing at boot.
pub fn init() {
    SERIAL.lock().init();
}

/// Prints to the console (interrupts are held off while the line is written, so handlers
/// that log cannot deadlock against us).
pub fn print(args: fmt::Arguments) {
    cpu::without_interrupts(|| {
        let _ = SERIAL.lock().write_fmt(args);
    });
}

/// Prints even if the console lock is held (by the code that just faulted or panicked).
pub fn emergency_print(args: fmt::Arguments) {
    PANICKING.store(true, Ordering::Relaxed);
    // SAFETY: we are about to stop the machine; a torn line is better than a silent hang.
    unsafe { SERIAL.force_unlock() };
    let _ = SERIAL.lock().write_fmt(args);
}

/// `print!` to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = crate::time::now_ns();
        print(format_args!(
            "[{:5}.{:06}] {:<5} {}\n",
            now / 1_000_000_000,
            now % 1_000_000_000 / 1000,
            record.level(),
            record.args()
        ));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger with the level from `log=<level>` on the command line (default info).
pub fn init_logging(level: Option<&str>) {
    let filter = match level.map(|text| text.to_ascii_lowercase()) {
        Some(ref text) if text == "off" => log::LevelFilter::Off,
        Some(ref text) if text == "error" => log::LevelFilter::Error,
        Some(ref text) if text == "warn" => log::LevelFilter::Warn,
        Some(ref text) if text == "debug" => log::LevelFilter::Debug,
        Some(ref text) if text == "trace" => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
    if let Some(text) = level
        && !["off", "error", "warn", "info", "debug", "trace"].contains(&text)
    {
        log::warn!("unknown log level {text:?}: using info");
    }
}

/// COM2, the lab control channel (commands from the test host; see `net::lab_control`).
const COM2: u16 = 0x2f8;
const LINE_STATUS_DATA_READY: u8 = 1 << 0;

static COM2_PRESENT: AtomicBool = AtomicBool::new(false);

/// Initialises COM2 (115200 8N1, no interrupts), keeping received bytes. Returns false when
/// there is no UART there.
pub fn init_control_port() -> bool {
    // SAFETY: COM2's registers; same programming as COM1. A missing UART reads 0xff.
    let present = unsafe {
        port::outb(COM2 + REG_INTERRUPT_ENABLE, 0);
        port::outb(COM2 + REG_LINE_CONTROL, 0x80);
        port::outb(COM2 + REG_DATA, 1);
        port::outb(COM2 + REG_INTERRUPT_ENABLE, 0);
        port::outb(COM2 + REG_LINE_CONTROL, 0x03);
        // FIFOs on, transmit FIFO cleared, receive FIFO kept: a command the host sent before
        // the channel was opened must not lose its first bytes.
        port::outb(COM2 + REG_FIFO_CONTROL, 0xc5);
        port::outb(COM2 + REG_MODEM_CONTROL, 0x03);
        port::inb(COM2 + REG_LINE_STATUS) != 0xff
    };
    COM2_PRESENT.store(present, Ordering::Relaxed);
    present
}

/// One byte from COM2 if one is waiting (never blocks).
pub fn read_control_byte() -> Option<u8> {
    if !COM2_PRESENT.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: reading COM2's line status has no side effects; reading the data register only
    // when data is ready consumes exactly that byte.
    unsafe {
        (port::inb(COM2 + REG_LINE_STATUS) & LINE_STATUS_DATA_READY != 0)
            .then(|| port::inb(COM2 + REG_DATA))
    }
}

/// How long one answer byte may wait for COM2's transmitter. The reader is a test harness on a
/// possibly busy host, and writing over a byte that has not gone out would corrupt the answer
/// (a count of 100 000 polls was not enough under load: answers arrived with bytes missing).
const CONTROL_BYTE_TIMEOUT_NS: u64 = 1_000_000_000;
/// Upper bound on polls per byte whatever the clock says (it reads 0 before calibration).
const CONTROL_BYTE_MAX_POLLS: u32 = 50_000_000;

/// Writes a line to COM2 (answers to control commands). A transmitter that stays busy for
/// [`CONTROL_BYTE_TIMEOUT_NS`] drops the rest of the line (logged): a reader sees a missing
/// answer, never a corrupted one.
pub fn write_control_line(text: &str) {
    if !COM2_PRESENT.load(Ordering::Relaxed) {
        return;
    }
    for byte in text.bytes().chain(core::iter::once(b'\n')) {
        let started_ns = crate::time::now_ns();
        let mut polls = 0u32;
        // SAFETY: as in read_control_byte.
        while unsafe { port::inb(COM2 + REG_LINE_STATUS) } & LINE_STATUS_THR_EMPTY == 0 {
            polls += 1;
            if polls >= CONTROL_BYTE_MAX_POLLS
                || crate::time::now_ns().saturating_sub(started_ns) > CONTROL_BYTE_TIMEOUT_NS
            {
                log::warn!(
                    "lab control: COM2 transmitter busy for 1 s; rest of the answer dropped"
                );
                return;
            }
            core::hint::spin_loop();
        }
        // SAFETY: writing COM2's transmit register sends one byte.
        unsafe { port::outb(COM2 + REG_DATA, byte) };
    }
}
