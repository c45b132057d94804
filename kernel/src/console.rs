//! The boot console behind the `log` facade, plus `print!`/`println!` for the boot report.
//!
//! Output goes straight to the architecture's polled UART (`arch::console_write`) under one spin
//! lock, so lines from different CPUs never interleave mid-line.

use core::fmt::{self, Write};
use spin::Mutex;

static LOCK: Mutex<()> = Mutex::new(());

struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().split_inclusive(|&b| b == b'\n') {
            match chunk.split_last() {
                Some((b'\n', body)) => {
                    crate::arch::console_write(body);
                    crate::arch::console_write(b"\r\n");
                }
                _ => crate::arch::console_write(chunk),
            }
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let _guard = LOCK.lock();
    let _ = Console.write_fmt(args);
}

/// Prints from a context where the console lock may be held by the interrupted code (exception
/// handlers, panics): bypasses the lock rather than deadlock.
pub fn print_unlocked(args: fmt::Arguments<'_>) {
    let _ = Console.write_fmt(args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                log::Level::Error => "ERROR",
                log::Level::Warn => "WARN ",
                log::Level::Info => "INFO ",
                log::Level::Debug => "DEBUG",
                log::Level::Trace => "TRACE",
            };
            _print(format_args!("[{level}] {}\n", record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the console logger; `level` comes from the `loglevel=` command-line option.
pub fn init_logger(level: Option<&str>) {
    let filter = match level {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    // A second call (impossible by construction) would only fail to replace the logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
}
