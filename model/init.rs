//! Weight initialisation from a host RNG. Burn's initialisers draw from a backend-global RNG
//! that parallel tests share; drawing on the host from our own seeded RNG makes a model's
//! weights a pure function of (config, seed), identical on every backend.

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

pub struct HostInit<'a, B: Backend> {
    pub rng: &'a mut StdRng,
    pub device: &'a B::Device,
    /// Standard deviation of ordinary weights (GPT-2's 0.02).
    pub std: f64,
}

impl<B: Backend> HostInit<'_, B> {
    /// A tensor with i.i.d. N(0, std²) entries.
    pub fn normal<const D: usize>(&mut self, shape: [usize; D], std: f64) -> Tensor<B, D> {
        let n = shape.iter().product();
        let dist = Normal::new(0.0f32, std as f32).expect("std is finite and positive");
        let values: Vec<f32> = (0..n).map(|_| dist.sample(self.rng)).collect();
        Tensor::from_data(TensorData::new(values, shape), self.device)
    }

    /// A bias-free linear layer; Burn stores the weight as `[d_in, d_out]`.
    pub fn linear(&mut self, d_in: usize, d_out: usize, std: f64) -> Linear<B> {
        Linear {
            weight: Param::from_tensor(self.normal([d_in, d_out], std)),
            bias: None,
        }
    }

    /// `layer` with a zero bias added.
    pub fn with_bias(&mut self, layer: Linear<B>) -> Linear<B> {
        let width = layer.weight.dims()[1];
        Linear {
            bias: Some(Param::from_tensor(Tensor::zeros([width], self.device))),
            ..layer
        }
    }

    pub fn embedding(&mut self, vocab: usize, d_model: usize) -> Embedding<B> {
        let std = self.std;
        Embedding {
            weight: Param::from_tensor(self.normal([vocab, d_model], std)),
        }
    }
}
