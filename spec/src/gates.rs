//! Eq. 1: the random gates of a Random Gated Network, and the paths they select.
//!
//! Paper, Sec. 3.2: each of the K random gated blocks (RGBs) repeats its layer n times and
//! opens exactly one of the n copies, each with probability 1/n:
//!
//! ```text
//! g_i = e_k  with probability 1/n,  k = 1..n           (Eq. 1)
//! ```
//!
//! A path P = (g_1·d_1, …, g_K·d_K) is therefore one candidate index per RGB. [`Path`] stores
//! those indices (0-based, RGB 1 first); [`PathSpace`] is the set of all n^K paths of one RGN
//! and owns everything that needs n and K: validation, parsing, uniform sampling (Eq. 1) and the
//! bijection with the integers 0..n^K.
//!
//! Text form: one digit per RGB in RGB order, `0-9` then `a-z` for candidates 10..35, so
//! `"0101"` is the path through candidate 0, 1, 0, 1 of a 4-RGB network.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Largest number of candidates per RGB that the text form can spell (digits 0-9, a-z).
pub const MAX_CANDIDATES: usize = 36;

/// Errors about paths: parsing, shape, and integer encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A character that is not a candidate digit (`0-9`, `a-z`).
    #[error("path {text:?}: character {ch:?} at position {position} is not a candidate digit (0-9, a-z)")]
    BadDigit {
        text: String,
        ch: char,
        position: usize,
    },
    /// A path with the wrong number of gates for its network.
    #[error("path {text:?} has {got} gates but the network has K = {expected} gated blocks")]
    WrongLength {
        text: String,
        got: usize,
        expected: usize,
    },
    /// A gate that selects a candidate the RGB does not have.
    #[error("path {text:?}: gate {gate} selects candidate {candidate} but each block has only n = {n} (allowed 0..{n})")]
    CandidateOutOfRange {
        text: String,
        gate: usize,
        candidate: usize,
        n: usize,
    },
    /// n^K does not fit in the integer type used for path indices.
    #[error("n^K = {n}^{k} paths do not fit in a 128-bit path index")]
    TooManyPaths { n: usize, k: usize },
    /// An integer that is not the index of any path.
    #[error("path index {index} is out of range: there are {count} paths (0..{count})")]
    IndexOutOfRange { index: u128, count: u128 },
    /// A path space with an invalid number of candidates.
    #[error("n = {n} candidates per block is outside 1..={MAX_CANDIDATES}")]
    BadCandidateCount { n: usize },
}

/// One path through a Random Gated Network: the candidate index chosen by each RGB's gate.
///
/// `Path` only stores the choices; whether they fit a network (length K, each below n) is
/// checked by [`PathSpace::check`]. Display and [`FromStr`] use one digit per gate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Path(Vec<u8>);

impl Path {
    /// A path from 0-based candidate indices, RGB 1 first.
    ///
    /// # Panics
    /// If an index is not below [`MAX_CANDIDATES`] (such a path has no text form).
    pub fn new(choices: Vec<u8>) -> Self {
        assert!(
            choices.iter().all(|&c| usize::from(c) < MAX_CANDIDATES),
            "candidate index above {MAX_CANDIDATES} in {choices:?}"
        );
        Path(choices)
    }

    /// The candidate chosen at RGB `gate` (0-based).
    pub fn choice(&self, gate: usize) -> usize {
        usize::from(self.0[gate])
    }

    /// All choices, RGB 1 first.
    pub fn choices(&self) -> &[u8] {
        &self.0
    }

    /// Number of gates (K).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for the path of a network with no gated blocks.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first `depth` choices: the gates a layer of dependency depth d(l) = `depth` sees.
    pub fn prefix(&self, depth: usize) -> &[u8] {
        &self.0[..depth.min(self.0.len())]
    }
}

fn digit_char(c: u8) -> char {
    char::from_digit(u32::from(c), MAX_CANDIDATES as u32).unwrap_or('?')
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0
            .iter()
            .try_for_each(|&c| write!(f, "{}", digit_char(c)))
    }
}

impl FromStr for Path {
    type Err = PathError;

    /// Parses one digit per gate (`0-9`, `a-z`, case-insensitive). Length and range against a
    /// network are checked by [`PathSpace::parse`].
    fn from_str(text: &str) -> Result<Self, PathError> {
        text.chars()
            .enumerate()
            .map(|(position, ch)| {
                ch.to_digit(MAX_CANDIDATES as u32)
                    .map(|d| d as u8)
                    .ok_or_else(|| PathError::BadDigit {
                        text: text.to_string(),
                        ch,
                        position,
                    })
            })
            .collect::<Result<Vec<u8>, _>>()
            .map(Path)
    }
}

impl TryFrom<String> for Path {
    type Error = PathError;
    fn try_from(text: String) -> Result<Self, PathError> {
        text.parse()
    }
}

impl From<Path> for String {
    fn from(path: Path) -> String {
        path.to_string()
    }
}

/// The n^K paths of one RGN: K gated blocks with n candidates each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPathSpace")]
pub struct PathSpace {
    n: usize,
    k: usize,
}

/// The serialised form of a [`PathSpace`], checked by [`PathSpace::new`] on the way in.
#[derive(Deserialize)]
struct RawPathSpace {
    n: usize,
    k: usize,
}

impl TryFrom<RawPathSpace> for PathSpace {
    type Error = PathError;
    fn try_from(raw: RawPathSpace) -> Result<Self, PathError> {
        PathSpace::new(raw.n, raw.k)
    }
}

impl PathSpace {
    /// The paths of an RGN with `k` gated blocks of `n` candidates.
    ///
    /// # Errors
    /// [`PathError::BadCandidateCount`] unless 1 <= n <= [`MAX_CANDIDATES`].
    pub fn new(n: usize, k: usize) -> Result<Self, PathError> {
        if !(1..=MAX_CANDIDATES).contains(&n) {
            return Err(PathError::BadCandidateCount { n });
        }
        Ok(PathSpace { n, k })
    }

    /// Candidates per RGB.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of RGBs.
    pub fn k(&self) -> usize {
        self.k
    }

    /// n^d as an exact count, or `None` when it exceeds `u128`.
    pub fn prefix_count(&self, depth: usize) -> Option<u128> {
        match u32::try_from(depth) {
            Ok(depth) => (self.n as u128).checked_pow(depth),
            // An exponent beyond u32: 1^d = 1, and n^d overflows for every n >= 2.
            Err(_) => (self.n == 1).then_some(1),
        }
    }

    /// The number of paths n^K.
    ///
    /// # Errors
    /// [`PathError::TooManyPaths`] when n^K exceeds `u128`.
    pub fn count(&self) -> Result<u128, PathError> {
        self.prefix_count(self.k).ok_or(PathError::TooManyPaths {
            n: self.n,
            k: self.k,
        })
    }

    /// Checks that `path` has K gates, each below n.
    ///
    /// # Errors
    /// [`PathError::WrongLength`] or [`PathError::CandidateOutOfRange`].
    pub fn check(&self, path: &Path) -> Result<(), PathError> {
        if path.len() != self.k {
            return Err(PathError::WrongLength {
                text: path.to_string(),
                got: path.len(),
                expected: self.k,
            });
        }
        match path.0.iter().position(|&c| usize::from(c) >= self.n) {
            Some(gate) => Err(PathError::CandidateOutOfRange {
                text: path.to_string(),
                gate,
                candidate: path.choice(gate),
                n: self.n,
            }),
            None => Ok(()),
        }
    }

    /// Parses a path written as one digit per gate and checks it against this network.
    ///
    /// # Errors
    /// Any [`PathError`] about digits, length or range, naming the text.
    pub fn parse(&self, text: &str) -> Result<Path, PathError> {
        let path: Path = text.parse()?;
        self.check(&path)?;
        Ok(path)
    }

    /// Eq. 1: a path with every gate drawn independently and uniformly from the n candidates.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Path {
        Path((0..self.k).map(|_| self.uniform_choice(rng)).collect())
    }

    /// One gate of Eq. 1: a candidate index uniform on 0..n.
    pub(crate) fn uniform_choice<R: Rng + ?Sized>(&self, rng: &mut R) -> u8 {
        rng.random_range(0..self.n as u8)
    }

    /// The path's integer index: its gates read as a base-n number, RGB 1 most significant,
    /// so integer order is lexicographic path order.
    ///
    /// # Errors
    /// [`PathError::TooManyPaths`] when n^K exceeds `u128`; any error of [`PathSpace::check`].
    pub fn index_of(&self, path: &Path) -> Result<u128, PathError> {
        self.count()?;
        self.check(path)?;
        Ok(digits_to_index(&path.0, self.n))
    }

    /// The path with integer index `index` (inverse of [`PathSpace::index_of`]).
    ///
    /// # Errors
    /// [`PathError::TooManyPaths`] or [`PathError::IndexOutOfRange`].
    pub fn path_at(&self, index: u128) -> Result<Path, PathError> {
        let count = self.count()?;
        if index >= count {
            return Err(PathError::IndexOutOfRange { index, count });
        }
        Ok(Path(index_to_digits(index, self.n, self.k)))
    }
}

/// Base-n digits (most significant first) to their value. The caller guarantees no overflow.
pub(crate) fn digits_to_index(digits: &[u8], n: usize) -> u128 {
    digits
        .iter()
        .fold(0u128, |acc, &d| acc * n as u128 + u128::from(d))
}

/// The `len` base-n digits (most significant first) of `index`.
pub(crate) fn index_to_digits(mut index: u128, n: usize, len: usize) -> Vec<u8> {
    let mut digits = vec![0u8; len];
    for slot in digits.iter_mut().rev() {
        *slot = (index % n as u128) as u8;
        index /= n as u128;
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_names_bad_input() {
        let space = PathSpace::new(2, 4).unwrap();
        let path = space.parse("0101").unwrap();
        assert_eq!(path.choices(), &[0, 1, 0, 1]);
        assert_eq!(path.to_string(), "0101");
        assert_eq!(
            space.parse("01?1").unwrap_err().to_string(),
            "path \"01?1\": character '?' at position 2 is not a candidate digit (0-9, a-z)"
        );
        assert_eq!(
            space.parse("010").unwrap_err().to_string(),
            "path \"010\" has 3 gates but the network has K = 4 gated blocks"
        );
        assert_eq!(
            space.parse("0121").unwrap_err().to_string(),
            "path \"0121\": gate 2 selects candidate 2 but each block has only n = 2 (allowed 0..2)"
        );
    }

    #[test]
    fn index_is_lexicographic() {
        let space = PathSpace::new(3, 2).unwrap();
        let all: Vec<String> = (0..9)
            .map(|i| space.path_at(i).unwrap().to_string())
            .collect();
        assert_eq!(all, ["00", "01", "02", "10", "11", "12", "20", "21", "22"]);
        assert!(matches!(
            space.path_at(9),
            Err(PathError::IndexOutOfRange { index: 9, count: 9 })
        ));
    }

    #[test]
    fn deserialising_checks_the_candidate_count() {
        let ok: PathSpace = serde_json::from_str(r#"{"n":2,"k":19}"#).unwrap();
        assert_eq!((ok.n(), ok.k()), (2, 19));
        let bad = serde_json::from_str::<PathSpace>(r#"{"n":300,"k":19}"#).unwrap_err();
        assert!(
            bad.to_string()
                .contains("n = 300 candidates per block is outside 1..=36"),
            "{bad}"
        );
    }

    #[test]
    fn huge_spaces_error_instead_of_overflowing() {
        let space = PathSpace::new(2, 128).unwrap();
        assert!(matches!(
            space.count(),
            Err(PathError::TooManyPaths { n: 2, k: 128 })
        ));
        assert_eq!(
            PathSpace::new(2, 127).unwrap().count().unwrap(),
            1u128 << 127
        );
        assert!(PathSpace::new(0, 3).is_err());
        assert!(PathSpace::new(37, 3).is_err());
    }
}
