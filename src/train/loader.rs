//! The training loader: batches of samples from a [`Dataset`] in a seeded, resumable order, with
//! prompts sampled from each mask (see `train::data` for the layouts and preprocessing).

use crate::error::{Error, Result};
use crate::sam::random::Rng;
use crate::sam::Prompts;
use crate::tensor::Tensor;
use crate::train::sampler;

use super::data::{derive, pick, shuffle, Dataset, Sample, ORDER_STREAM};

/// How the loader batches and prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderOptions {
    /// Samples per batch (a depth chunk counts as one sample of d images).
    pub batch: usize,
    /// Positive clicks per image.
    pub pos: usize,
    /// Negative clicks per image.
    pub neg: usize,
    /// Box prompts from the mask's bounding box, each side jittered by up to this many pixels.
    pub box_jitter: Option<u32>,
    /// Shuffle each epoch (training) or keep the case order (validation).
    pub shuffle: bool,
    /// Run through epochs forever (training) or stop after one (validation).
    pub repeat: bool,
    /// Seed of the orders, chunk placements and prompts.
    pub seed: u64,
}

impl LoaderOptions {
    /// Training: shuffled, endless, one positive click per image (the reference's prompt).
    pub fn train(batch: usize, seed: u64) -> Self {
        LoaderOptions {
            batch,
            pos: 1,
            neg: 0,
            box_jitter: None,
            shuffle: true,
            repeat: true,
            seed,
        }
    }

    /// Validation: one pass in case order, the same prompts every time for a given seed.
    pub fn eval(batch: usize, seed: u64) -> Self {
        LoaderOptions {
            shuffle: false,
            repeat: false,
            ..Self::train(batch, seed)
        }
    }
}

/// Where a loader stands: enough to resume it exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoaderState {
    /// Epochs completed.
    pub epoch: u64,
    /// Position in the current epoch's order.
    pub pos: u64,
    /// Samples skipped so far because their mask was empty.
    pub skipped: u64,
}

impl LoaderState {
    /// As three words (`epoch, pos, skipped`), for a checkpoint's RNG state.
    pub fn to_words(self) -> Vec<u64> {
        vec![self.epoch, self.pos, self.skipped]
    }

    /// From [`LoaderState::to_words`].
    pub fn from_words(w: &[u64]) -> Result<Self> {
        match *w {
            [epoch, pos, skipped] => Ok(LoaderState {
                epoch,
                pos,
                skipped,
            }),
            _ => Err(Error::Input(format!(
                "loader state has {} words, expected 3 (epoch, position, skipped)",
                w.len()
            ))),
        }
    }
}

/// A batch: samples, their prompts, and how the encoder should read them.
#[derive(Clone, Debug)]
pub struct Batch {
    /// The samples, in order; their images are the batch's images in order.
    pub samples: Vec<Sample>,
    /// Prompts of every image, in model-input pixels: `point_coords` `[N, P, 2]` and
    /// `point_labels` `[N, P]` (P = pos + neg, padding label -1) when P > 0, `boxes` `[N, 4]`
    /// when boxes are on.
    pub prompts: Prompts,
    /// `Some(d)` when the samples are depth chunks: the N images are N/d volumes of d slices,
    /// slice index fastest (the encoder's `DepthSpec`).
    pub depth: Option<usize>,
    /// Model input size S.
    pub size: usize,
}

impl Batch {
    /// Number of images N (samples times slices per sample).
    pub fn len(&self) -> usize {
        self.samples.iter().map(|s| s.planes()).sum()
    }

    /// Whether the batch has no image.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The images stacked, `[N, 3, S, S]`.
    pub fn images(&self) -> Result<Tensor> {
        let mut data = Vec::with_capacity(self.len() * 3 * self.size * self.size);
        for s in &self.samples {
            data.extend_from_slice(s.image.data());
        }
        Tensor::from_vec(data, &[self.len(), 3, self.size, self.size])
    }

    /// The masks at the model input, `[N, 1, S, S]` of 0/1.
    pub fn masks(&self) -> Result<Tensor> {
        let data = self
            .samples
            .iter()
            .flat_map(|s| s.mask.iter().map(|&m| if m { 1.0 } else { 0.0 }))
            .collect();
        Tensor::from_vec(data, &[self.len(), 1, self.size, self.size])
    }

    /// The targets on the `g x g` low-resolution grid, `[N, 1, g, g]` ([`downsample_mask`]).
    pub fn targets(&self, g: usize) -> Result<Tensor> {
        let mut data = Vec::with_capacity(self.len() * g * g);
        for s in &self.samples {
            data.extend_from_slice(s.target(g)?.data());
        }
        Tensor::from_vec(data, &[self.len(), 1, g, g])
    }
}

/// Prompts of one image: `pos + neg` points `(x, y, label)` and the optional box.
type PlanePrompts = (Vec<[f32; 3]>, Option<[f32; 4]>);

/// Yields batches of a [`Dataset`] with sampled prompts; see the module documentation.
pub struct Loader<'a> {
    ds: &'a Dataset,
    opts: LoaderOptions,
    order: Vec<usize>,
    state: LoaderState,
}

impl<'a> Loader<'a> {
    /// A loader at the start of epoch 0.
    pub fn new(ds: &'a Dataset, opts: LoaderOptions) -> Result<Self> {
        if opts.batch == 0 {
            return Err(Error::Input("batch size 0: expected at least 1".into()));
        }
        if ds.is_empty() {
            return Err(Error::Input("the dataset has no samples".into()));
        }
        let mut l = Loader {
            ds,
            opts,
            order: Vec::new(),
            state: LoaderState::default(),
        };
        l.order = l.order_of(0);
        Ok(l)
    }

    fn order_of(&self, epoch: u64) -> Vec<usize> {
        let mut o: Vec<usize> = (0..self.ds.len()).collect();
        if self.opts.shuffle {
            shuffle(
                &mut o,
                &mut Rng::new(derive(self.opts.seed, ORDER_STREAM, epoch)),
            );
        }
        o
    }

    /// The current state (save it with the checkpoint to resume).
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continues from a saved state (same dataset and options).
    pub fn restore(&mut self, st: LoaderState) -> Result<()> {
        if st.pos > self.ds.len() as u64 {
            return Err(Error::Input(format!(
                "loader state position {} is beyond the epoch's {} samples: the dataset changed since it was saved",
                st.pos,
                self.ds.len()
            )));
        }
        self.order = self.order_of(st.epoch);
        self.state = st;
        Ok(())
    }

    /// Samples skipped so far because their mask was empty (with the dataset's load-time
    /// filtering this stays 0; it is the guard for masks that come out empty anyway).
    pub fn skipped(&self) -> u64 {
        self.state.skipped
    }

    /// Prompts of one S x S plane, or `None` when `fill_empty` is off and the mask is empty.
    fn plane_prompts(
        &self,
        mask: &[bool],
        s: usize,
        rng: &mut Rng,
        fill_empty: bool,
    ) -> Option<PlanePrompts> {
        let o = &self.opts;
        let np = o.pos + o.neg;
        match sampler::sample(mask, s, s, o.pos, o.neg, o.box_jitter, rng) {
            Some(mut sm) => {
                sm.points.resize(np, [0.0, 0.0, -1.0]);
                Some((sm.points, sm.bbox))
            }
            None if fill_empty => {
                let points = (0..np)
                    .map(|_| [pick(rng, s) as f32, pick(rng, s) as f32, 0.0])
                    .collect();
                let full = (s - 1) as f32;
                Some((points, o.box_jitter.map(|_| [0.0, 0.0, full, full])))
            }
            None => None,
        }
    }

    /// The next batch: always `batch` samples when repeating; in a single pass, fewer at the end
    /// and `None` after it.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let len = self.ds.len() as u64;
        let s = self.ds.opts.size;
        let mut samples = Vec::with_capacity(self.opts.batch);
        let mut rows: Vec<PlanePrompts> = Vec::new();
        let mut misses = 0u64;
        while samples.len() < self.opts.batch {
            if self.state.pos >= len {
                if !self.opts.repeat {
                    break;
                }
                self.state.epoch += 1;
                self.state.pos = 0;
                self.order = self.order_of(self.state.epoch);
            }
            let st = self.state;
            let mut rng = Rng::new(derive(self.opts.seed, st.epoch, st.pos));
            self.state.pos += 1;
            let sample = self.ds.sample(self.order[st.pos as usize], &mut rng)?;
            let chunk = self.ds.opts.depth.is_some();
            let any_fg = sample.mask.iter().any(|&m| m);
            let prompts: Option<Vec<PlanePrompts>> = if any_fg {
                (0..sample.planes())
                    .map(|i| self.plane_prompts(sample.plane_mask(i), s, &mut rng, chunk))
                    .collect()
            } else {
                None
            };
            match prompts {
                Some(p) => {
                    rows.extend(p);
                    samples.push(sample);
                    misses = 0;
                }
                None => {
                    self.state.skipped += 1;
                    misses += 1;
                    if misses > len {
                        return Err(Error::Input(
                            "every sample of an epoch has an empty mask".into(),
                        ));
                    }
                }
            }
        }
        if samples.is_empty() {
            return Ok(None);
        }
        let n = rows.len();
        let np = self.opts.pos + self.opts.neg;
        let mut prompts = Prompts::default();
        if np > 0 {
            let coords = rows
                .iter()
                .flat_map(|(p, _)| p.iter().flat_map(|q| [q[0], q[1]]))
                .collect();
            let labels = rows
                .iter()
                .flat_map(|(p, _)| p.iter().map(|q| q[2]))
                .collect();
            prompts.point_coords = Some(Tensor::from_vec(coords, &[n, np, 2])?);
            prompts.point_labels = Some(Tensor::from_vec(labels, &[n, np])?);
        }
        if self.opts.box_jitter.is_some() {
            let boxes = rows
                .iter()
                .flat_map(|(_, b)| b.unwrap_or([0.0; 4]))
                .collect();
            prompts.boxes = Some(Tensor::from_vec(boxes, &[n, 4])?);
        }
        Ok(Some(Batch {
            samples,
            prompts,
            depth: self.ds.opts.depth,
            size: s,
        }))
    }
}

impl Iterator for Loader<'_> {
    type Item = Result<Batch>;

    /// [`Loader::next_batch`] as an iterator (endless when repeating).
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}
