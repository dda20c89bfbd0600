//! Exact decimal text to integers, without floating point.
//!
//! A number arrives as the text of a JSON number (`512`, `0.550000011920929`,
//! `5.12e2`) or inside a JSON string (`"512"`). The text is read digit by digit:
//! nothing is ever converted to `f64`, so `0.1` is exactly one tenth.
//!
//! Two readings are offered, one per kind of field:
//! - [`Num::whole`]: the exact value when it is a whole number (`512`, `512.0`,
//!   `5.12e2`); `512.5` has none.
//! - [`Num::micro`]: the value rounded half-up to six decimal places, in
//!   millionths. Fractional fields (`hrScale`, `upscale`, `denoisingStrength`)
//!   use this, which is how C# float noise is tamed: `0.550000011920929` is
//!   `550000`, `2.0000000001` is exactly `2000000`. A 32-bit float carries about
//!   seven significant digits, so below 4 its noise sits beyond the sixth decimal
//!   and rounds away; limits and prices then see the value the client meant.

/// Millionths: the fixed-point unit of fractional fields.
pub(crate) const MICRO: u128 = 1_000_000;

/// Values at or above 10^30 are refused as too large before any arithmetic, so
/// every reading below fits a `u128` with room to spare.
const MAX_INT_DIGITS: i64 = 30;

/// The exponent is saturated here; anything this far out is too large or zero.
const EXP_CAP: i64 = 1_000_000_000;

/// A parsed number: its sign and its two exact readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Num {
    /// True for a value below zero (`-0` is not negative).
    pub(crate) negative: bool,
    /// The magnitude when it is a whole number below 10^30.
    pub(crate) whole: Option<u128>,
    /// The magnitude rounded half-up to six decimals, in millionths, when below 10^30.
    pub(crate) micro: Option<u128>,
}

/// Parses decimal text: an optional sign (`+` only when `allow_plus`), digits
/// with an optional fraction (`5`, `5.`, `.5`, `5.25`) and an optional exponent.
/// Returns `None` for anything else, including empty text.
pub(crate) fn parse(text: &str, allow_plus: bool) -> Option<Num> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut negative = false;
    match b.first() {
        Some(b'-') => {
            negative = true;
            i += 1;
        }
        Some(b'+') if allow_plus => i += 1,
        _ => {}
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int = &b[int_start..i];
    let mut frac: &[u8] = &[];
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac = &b[frac_start..i];
    }
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut exp: i64 = 0;
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        let mut exp_negative = false;
        match b.get(i) {
            Some(b'-') => {
                exp_negative = true;
                i += 1;
            }
            Some(b'+') => i += 1,
            _ => {}
        }
        let exp_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            exp = (exp * 10 + i64::from(b[i] - b'0')).min(EXP_CAP);
            i += 1;
        }
        if i == exp_start {
            return None;
        }
        if exp_negative {
            exp = -exp;
        }
    }
    if i != b.len() {
        return None;
    }
    Some(Digits { int, frac, exp }.evaluate(negative))
}

/// The mantissa digits as two slices (before and after the point) and the exponent.
struct Digits<'t> {
    int: &'t [u8],
    frac: &'t [u8],
    exp: i64,
}

impl Digits<'_> {
    fn len(&self) -> usize {
        self.int.len() + self.frac.len()
    }

    /// The digit at `i` counting across both slices.
    fn digit(&self, i: usize) -> u128 {
        let c = if i < self.int.len() {
            self.int[i]
        } else {
            self.frac[i - self.int.len()]
        };
        u128::from(c - b'0')
    }

    fn evaluate(&self, negative: bool) -> Num {
        let len = self.len();
        let Some(first) = (0..len).find(|&i| self.digit(i) != 0) else {
            return Num {
                negative: false,
                whole: Some(0),
                micro: Some(0),
            };
        };
        // `first` exists, so a last non-zero digit does too.
        let last = (first..len)
            .rev()
            .find(|&i| self.digit(i) != 0)
            .unwrap_or(first);
        let significant = (last - first + 1) as i64;
        // Digits from the first significant one up to the decimal point.
        let point = self.int.len() as i64 + self.exp - first as i64;
        if point > MAX_INT_DIGITS {
            return Num {
                negative,
                whole: None,
                micro: None,
            };
        }
        let whole = (significant <= point).then(|| self.leading(first, last, point));
        let keep = point + 6;
        let mut micro = if keep > 0 {
            self.leading(first, last, keep)
        } else {
            0
        };
        // Round half-up on the first dropped digit: a 5 or more means at least half.
        let dropped = if keep >= 0 && keep < significant {
            self.digit(first + keep as usize)
        } else {
            0
        };
        if dropped >= 5 {
            micro += 1;
        }
        Num {
            negative,
            whole,
            micro: Some(micro),
        }
    }

    /// The first `count` digits from `first` as an integer, zero-padded past `last`.
    /// Callers keep `count` at most 36, so the result fits a `u128`.
    fn leading(&self, first: usize, last: usize, count: i64) -> u128 {
        let mut acc: u128 = 0;
        for k in 0..count.max(0) as usize {
            let idx = first + k;
            let d = if idx <= last { self.digit(idx) } else { 0 };
            acc = acc * 10 + d;
        }
        acc
    }
}

/// Writes `value / 10^scale` as exact decimal text, without trailing zeros.
pub(crate) fn format_scaled(value: u128, scale: u32) -> String {
    let div = 10u128.pow(scale);
    let int = value / div;
    let mut frac = value % div;
    if frac == 0 {
        return int.to_string();
    }
    let mut digits = scale as usize;
    while frac % 10 == 0 {
        frac /= 10;
        digits -= 1;
    }
    format!("{int}.{frac:0digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(t: &str) -> Num {
        parse(t, true).unwrap_or(Num {
            negative: true,
            whole: None,
            micro: None,
        })
    }

    #[test]
    fn reads_whole_numbers_in_every_spelling() {
        for t in [
            "512", "512.0", "5.12e2", "0512", "51200e-2", "+512", "512.000",
        ] {
            assert_eq!(num(t).whole, Some(512), "{t}");
        }
    }

    #[test]
    fn a_fraction_is_not_whole() {
        assert_eq!(num("512.5").whole, None);
        assert_eq!(num("1e-7").whole, None);
        assert_eq!(num("512.5").micro, Some(512_500_000));
    }

    #[test]
    fn rounds_float_noise_to_six_decimals_half_up() {
        assert_eq!(num("0.550000011920929").micro, Some(550_000));
        assert_eq!(num("2.0000000001").micro, Some(2_000_000));
        assert_eq!(num("1.10000002384186").micro, Some(1_100_000));
        assert_eq!(num("0.0000005").micro, Some(1));
        assert_eq!(num("0.00000049999").micro, Some(0));
        assert_eq!(num("2.9999995").micro, Some(3_000_000));
        assert_eq!(num("5e-7").micro, Some(1));
        assert_eq!(num("1e-9999999999999").micro, Some(0));
    }

    #[test]
    fn refuses_values_of_thirty_digits_or_more() {
        assert_eq!(num("1e30").whole, None);
        assert_eq!(num("1e30").micro, None);
        assert_eq!(num("1000000000000000000000000000000").micro, None);
        assert!(num("999999999999999999999999999999").micro.is_some());
        assert_eq!(
            num("99999999999999999999999999999").whole,
            Some(99_999_999_999_999_999_999_999_999_999)
        );
        assert_eq!(num("1e99999999999999999999").whole, None);
    }

    #[test]
    fn zero_is_never_negative() {
        assert!(!num("-0.000").negative);
        assert!(num("-0.5").negative);
    }

    #[test]
    fn rejects_text_that_is_not_a_number() {
        for t in [
            "", "-", ".", "abc", "1e", "1e+", "1.2.3", "0x10", " 1", "1 ", "++1",
        ] {
            assert_eq!(parse(t, true), None, "{t:?}");
        }
        assert_eq!(parse("+1", false), None);
    }

    #[test]
    fn formats_exact_decimals() {
        assert_eq!(format_scaled(12_000_952_320, 9), "12.00095232");
        assert_eq!(format_scaled(4_000_000, 6), "4");
        assert_eq!(format_scaled(5, 3), "0.005");
    }
}
