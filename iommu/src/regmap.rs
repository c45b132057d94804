//! The register-description scaffold both IOMMU drivers describe their MMIO register files
//! with: [`Width`] and [`RegInfo`] for the fixed register maps (`vtd::regs::REGISTERS`, VT-d 4.1
//! §11.4; `smmuv3::regs::REGISTERS`, SMMUv3 §6.3), and the `NAME=value` item writer their ID
//! register `Display`s share. Each driver keeps its own bit-field accessors, since VT-d's
//! registers are read as 64-bit words and the SMMU's as 32-bit ones (SMMUv3 §6.2).

use core::fmt;

/// Width of a register access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    W32,
    W64,
}

impl Width {
    /// Size in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            Width::W32 => 4,
            Width::W64 => 8,
        }
    }
}

/// One register of a fixed register map, for dumps and sanity checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegInfo {
    pub name: &'static str,
    pub offset: usize,
    pub width: Width,
}

/// A [`RegInfo`] in a `const` register table.
pub(crate) const fn reg(name: &'static str, offset: usize, width: Width) -> RegInfo {
    RegInfo {
        name,
        offset,
        width,
    }
}

/// Writes space-separated `NAME=value` / `NAME` / `NAME=no` items.
pub(crate) struct Items<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    first: bool,
}

impl<'a, 'b> Items<'a, 'b> {
    pub(crate) fn new(f: &'a mut fmt::Formatter<'b>) -> Self {
        Items { f, first: true }
    }

    fn sep(&mut self) -> fmt::Result {
        if !self.first {
            self.f.write_str(" ")?;
        }
        self.first = false;
        Ok(())
    }

    /// A present feature prints as `NAME`, an absent one as `NAME=no`.
    pub(crate) fn flag(&mut self, name: &str, on: bool) -> fmt::Result {
        self.sep()?;
        if on {
            self.f.write_str(name)
        } else {
            write!(self.f, "{name}=no")
        }
    }

    pub(crate) fn val(&mut self, name: &str, value: fmt::Arguments<'_>) -> fmt::Result {
        self.sep()?;
        write!(self.f, "{name}={value}")
    }

    /// A bare word (a value without a name).
    pub(crate) fn word(&mut self, word: fmt::Arguments<'_>) -> fmt::Result {
        self.sep()?;
        self.f.write_fmt(word)
    }

    /// More text for the current item, with no separator (a list after `word("gran=")`).
    pub(crate) fn append(&mut self, text: &str) -> fmt::Result {
        self.f.write_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sample;

    impl fmt::Display for Sample {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let mut it = Items::new(f);
            it.val("N", format_args!("{}", 3))?;
            it.flag("ON", true)?;
            it.flag("OFF", false)?;
            it.word(format_args!("w="))?;
            it.append("a,b")
        }
    }

    #[test]
    fn items_are_space_separated() {
        assert_eq!(std::format!("{Sample}"), "N=3 ON OFF=no w=a,b");
        assert_eq!((Width::W32.bytes(), Width::W64.bytes()), (4, 8));
    }
}
