//! ggml's tensor element types and their dequantisation to f32.
//!
//! Quantised types store blocks of consecutive elements along a tensor's innermost dimension:
//! 32 elements for the simple types (`Q4_0` … `Q8_0`), 256 for the "K-quants" (`Q2_K` …
//! `Q6_K`, what common `Q4_K_M` / `Q5_K_M` files are made of), each with an f16 scale (and for
//! some types an f16 minimum) and packed integers; the K-quants add 6- or 8-bit sub-block
//! scales. The formulas are llama.cpp's `dequantize_row_*` (ggml-quants.c), written with the
//! same order of float operations as the `gguf` Python package's reader, so values agree
//! bit for bit with that reference (tested against fixtures it wrote).

use half::{bf16, f16};

/// Elements per block of the K-quants.
const QK_K: usize = 256;

/// A ggml element type this reader can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// Every supported type with its ggml id, elements per block and bytes per block.
const TYPES: [(GgmlType, u32, usize, usize); 13] = [
    (GgmlType::F32, 0, 1, 4),
    (GgmlType::F16, 1, 1, 2),
    (GgmlType::Q4_0, 2, 32, 18),
    (GgmlType::Q4_1, 3, 32, 20),
    (GgmlType::Q5_0, 6, 32, 22),
    (GgmlType::Q5_1, 7, 32, 24),
    (GgmlType::Q8_0, 8, 32, 34),
    (GgmlType::Q2_K, 10, QK_K, 84),
    (GgmlType::Q3_K, 11, QK_K, 110),
    (GgmlType::Q4_K, 12, QK_K, 144),
    (GgmlType::Q5_K, 13, QK_K, 176),
    (GgmlType::Q6_K, 14, QK_K, 210),
    (GgmlType::BF16, 30, 1, 2),
];

impl GgmlType {
    fn entry(self) -> (GgmlType, u32, usize, usize) {
        *TYPES.iter().find(|t| t.0 == self).expect("every type is listed")
    }

    /// The type of ggml id `id`, when this reader supports it.
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// Elements per block.
    pub fn block(self) -> usize {
        self.entry().2
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.entry().3
    }

    /// Bytes that `elements` values take, `None` unless they fill whole blocks.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let block = self.block() as u64;
        elements
            .is_multiple_of(block)
            .then(|| elements / block * self.block_bytes() as u64)
    }

    /// The supported types' names, for error messages.
    pub fn names() -> String {
        TYPES
            .iter()
            .map(|t| format!("{:?}", t.0))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `raw`, a whole number of `kind` blocks, as f32 values in storage order.
pub fn dequantize(kind: GgmlType, raw: &[u8]) -> Vec<f32> {
    let bytes = kind.block_bytes();
    debug_assert_eq!(raw.len() % bytes, 0);
    let mut out = Vec::with_capacity(raw.len() / bytes * kind.block());
    let half = |b: &[u8]| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    for b in raw.chunks_exact(bytes) {
        match kind {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(half(b)),
            GgmlType::BF16 => out.push(bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            GgmlType::Q4_0 => q4(half(b), None, &b[2..18], &mut out),
            GgmlType::Q4_1 => q4(half(b), Some(half(&b[2..])), &b[4..20], &mut out),
            GgmlType::Q5_0 => q5(half(b), None, &b[2..6], &b[6..22], &mut out),
            GgmlType::Q5_1 => q5(half(b), Some(half(&b[2..])), &b[4..8], &b[8..24], &mut out),
            GgmlType::Q8_0 => {
                let d = half(b);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q2_K => q2_k(b, half(&b[80..]), half(&b[82..]), &mut out),
            GgmlType::Q3_K => q3_k(b, half(&b[108..]), &mut out),
            GgmlType::Q4_K => q4_k(half(b), half(&b[2..]), &b[4..16], &b[16..144], &mut out),
            GgmlType::Q5_K => q5_k(half(b), half(&b[2..]), &b[4..16], &b[16..48], &b[48..176], &mut out),
            GgmlType::Q6_K => q6_k(&b[..128], &b[128..192], &b[192..208], half(&b[208..]), &mut out),
        }
    }
    out
}

/// `Q4_0` (`q − 8`, times d) and `Q4_1` (q times d, plus m): low nibbles are the block's
/// first 16 elements, high nibbles the last 16.
fn q4(d: f32, m: Option<f32>, qs: &[u8], out: &mut Vec<f32>) {
    let value = |q: u8| match m {
        None => (q as i32 - 8) as f32 * d,
        Some(m) => q as f32 * d + m,
    };
    out.extend(qs.iter().map(|&q| value(q & 0x0F)));
    out.extend(qs.iter().map(|&q| value(q >> 4)));
}

/// `Q5_0` / `Q5_1`: `Q4_*` with a fifth bit per element from the 32-bit mask `qh`.
fn q5(d: f32, m: Option<f32>, qh: &[u8], qs: &[u8], out: &mut Vec<f32>) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let value = |q: u32| match m {
        None => (q as i32 - 16) as f32 * d,
        Some(m) => q as f32 * d + m,
    };
    out.extend(
        qs.iter()
            .enumerate()
            .map(|(j, &q)| value((q & 0x0F) as u32 | ((qh >> j) << 4 & 0x10))),
    );
    out.extend(
        qs.iter()
            .enumerate()
            .map(|(j, &q)| value((q >> 4) as u32 | ((qh >> (j + 12)) & 0x10))),
    );
}

/// `Q2_K`: 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit minimum; 2-bit values.
fn q2_k(b: &[u8], d: f32, dmin: f32, out: &mut Vec<f32>) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let mut is = 0;
    for q in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for half in [&q[..16], &q[16..]] {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                out.extend(half.iter().map(|&v| dl * ((v >> shift) & 3) as f32 - ml));
            }
        }
    }
}

/// `Q3_K`: 16 sub-blocks of 16 with 6-bit signed scales (packed in 12 bytes); 3-bit values
/// whose high bit, from `hmask`, is inverted (a clear bit subtracts 4).
fn q3_k(b: &[u8], d: f32, out: &mut Vec<f32>) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let aux = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let scale = |i: usize| (aux[i / 4].to_le_bytes()[i % 4] as i32 - 32) as f32;
    let mut is = 0;
    let mut m = 1u8;
    for q in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for (q, h) in [(&q[..16], &hmask[..16]), (&q[16..], &hmask[16..])] {
                let dl = d * scale(is);
                is += 1;
                out.extend(
                    q.iter()
                        .zip(h)
                        .map(|(&v, &h)| dl * (((v >> shift) & 3) as i32 - if h & m != 0 { 0 } else { 4 }) as f32),
                );
            }
            m <<= 1;
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` (of 8) in a K-quant's 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// `Q4_K`: 8 sub-blocks of 32 with 6-bit scales and minima; 4-bit values, each 32-byte run
/// holding two sub-blocks (low nibbles, then high).
fn q4_k(d: f32, dmin: f32, scales: &[u8], qs: &[u8], out: &mut Vec<f32>) {
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        for (sub, shift) in [(2 * pair, 0), (2 * pair + 1, 4)] {
            let (sc, m) = scale_min_k4(sub, scales);
            let (d1, m1) = (d * sc, dmin * m);
            out.extend(q.iter().map(|&v| d1 * ((v >> shift) & 0x0F) as f32 - m1));
        }
    }
}

/// `Q5_K`: `Q4_K` with a fifth bit per element from `qh` (bit 2·pair for the low nibbles,
/// 2·pair + 1 for the high).
fn q5_k(d: f32, dmin: f32, scales: &[u8], qh: &[u8], qs: &[u8], out: &mut Vec<f32>) {
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        for (sub, shift) in [(2 * pair, 0), (2 * pair + 1, 4)] {
            let (sc, m) = scale_min_k4(sub, scales);
            let (d1, m1) = (d * sc, dmin * m);
            let bit = 1u8 << sub;
            out.extend(
                q.iter()
                    .zip(qh)
                    .map(|(&v, &h)| d1 * (((v >> shift) & 0x0F) + if h & bit != 0 { 16 } else { 0 }) as f32 - m1),
            );
        }
    }
}

/// `Q6_K`: 16 sub-blocks of 16 with signed 8-bit scales; 6-bit values from a low nibble in
/// `ql` and two high bits in `qh`, offset by −32.
fn q6_k(ql: &[u8], qh: &[u8], scales: &[u8], d: f32, out: &mut Vec<f32>) {
    for half in 0..2 {
        let (ql, qh, sc) = (
            &ql[64 * half..64 * half + 64],
            &qh[32 * half..32 * half + 32],
            &scales[8 * half..8 * half + 8],
        );
        let start = out.len();
        out.resize(start + 128, 0.0);
        let y = &mut out[start..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| d * sc[i] as i8 as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}
