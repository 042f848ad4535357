//! Closed sets of values with one name each (safety levels, sizes, formats, outcomes...): one
//! place parses a name, one prints it, and every message that lists the allowed values takes
//! the list from here.

/// A type whose every value has one fixed name.
pub trait Named: Copy + PartialEq + 'static {
    /// Every value, in the order messages list them.
    const ALL: &'static [Self];

    fn name(self) -> &'static str;

    /// The value with exactly this name.
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == s)
    }

    /// The value with this name in any ASCII case, surrounding blanks ignored.
    fn parse_any_case(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL.iter().copied().find(|v| v.name().eq_ignore_ascii_case(s))
    }

    /// The names, for messages: `a, b, c`.
    fn expected() -> String {
        Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
    }
}

/// Implements `Named` (and an inherent `as_str`) for a field-less enum:
/// `named!(Style { Vivid => "vivid", Natural => "natural" });`
macro_rules! named {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $crate::named::Named for $ty {
            const ALL: &'static [Self] = &[$($ty::$variant),+];
            fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        #[allow(dead_code)]
        impl $ty {
            pub fn as_str(self) -> &'static str {
                $crate::named::Named::name(self)
            }
        }
    };
}
pub(crate) use named;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fruit {
        Apple,
        Pear,
    }
    named!(Fruit { Apple => "apple", Pear => "PEAR" });

    #[test]
    fn one_place_parses_and_prints() {
        assert_eq!(Fruit::parse("apple"), Some(Fruit::Apple));
        assert_eq!(Fruit::parse("Apple"), None);
        assert_eq!(Fruit::parse_any_case(" pear "), Some(Fruit::Pear));
        assert_eq!(Fruit::Pear.as_str(), "PEAR");
        assert_eq!(Fruit::expected(), "apple, PEAR");
    }
}
