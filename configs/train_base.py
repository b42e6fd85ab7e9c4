"""Base training config: every field train.py reads, with its default. Variants import it and override a few.

    python train.py --config configs/train_base.py --config.workdir=runs/x --config.model.init_from=PATH \
        --config.data.source=folder --config.data.path=my_images

Any field can be overridden with --config.FIELD=VALUE (nested: --config.optimizer.learning_rate=1e-5);
an unknown field is an error. Step counts (num_steps, *_every, warmup_steps) are optimizer steps.
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.workdir = ""                 # required: checkpoints, metrics.jsonl, tensorboard/, previews/, export/
    c.stage = "diffusion"          # diffusion (UNet, + text encoder) | autoencoder (the VAE itself)
    c.seed = 0                     # model init, data order and augmentation, noise: one seed for the run
    c.num_steps = 10_000           # optimizer steps
    c.batch_size = 64              # global images per step over all hosts and devices (a multiple of the devices)
    c.train_text_encoder = False   # with its own learning rate: optimizer.text_encoder_learning_rate

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""         # diffusers folder | .safetensors/.ckpt | a VAE (autoencoder run workdir/export)
    c.model.variant = ""           # sdjax.variants name for what init_from does not provide (random init)
    c.model.prediction_type = ""   # "" = the scheduler's; or epsilon | v_prediction | sample (also exported)
    c.model.dtype = "float32"      # compute dtype: float32 | bfloat16 | float16
    c.model.param_dtype = "float32"  # parameters, optimizer state and EMA
    c.model.attention_impl = "auto"  # auto | einsum | xla | cudnn
    c.model.remat = False          # rematerialise each UNet block (less memory, ~30% more compute)
    c.model.clip_skip = 0          # text encoder layers skipped from the end (diffusers' clip_skip)

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"       # shapes | folder | tfds
    c.data.path = ""               # folder: images + .txt captions, or metadata.jsonl
    c.data.missing_caption = "error"  # folder: error | empty
    c.data.min_size = 32           # folder: smaller images are skipped (and counted)
    c.data.caption_column = "text"  # folder: metadata.jsonl caption key
    c.data.tfds_name = ""          # tfds: e.g. "my_dataset:1.0.0" (random-access, array_record format)
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = ""      # "" = TFDS's default (~/tensorflow_datasets)
    c.data.image_key = "image"     # tfds feature names
    c.data.caption_key = "caption"
    c.data.shapes_size = 64        # shapes: rendered size (then resized to resolution)
    c.data.shapes_length = 100_000
    c.data.shapes_split = "train"  # train | heldout | all
    c.data.shapes_colors = ()      # shapes: colours drawn (() = the demo's 8; "pink" is new; repeat one to weight it;
                                   # on the command line: --config.data.shapes_colors=pink,red)
    c.data.resolution = 512
    c.data.center_crop = True      # False: random crop
    c.data.random_flip = False     # never for shapes (left/right are in the captions)
    c.data.caption_dropout = 0.0   # probability of training on "" (for classifier-free guidance)
    c.data.caption_chunks = 1      # 77-token chunks per caption: 1 cuts at 75 tokens (as SD), k keeps 75 k
    c.data.weighted_captions = False  # parse A1111's "(word:1.2)" / "[word]" / BREAK in captions
    c.data.resample = "bicubic"
    c.data.shuffle = True
    c.data.num_threads = 8         # per host, for decoding and preprocessing
    c.data.cache_latents = False   # encode every image (and caption, if the text encoder is frozen) once
    c.data.aesthetic_score = 6.0   # SDXL refiner: the score every image is conditioned on (its pipeline's default)

    c.objective = ml_collections.ConfigDict()
    c.objective.min_snr_gamma = 0.0   # > 0: min-SNR-gamma loss weighting (5.0 is usual)
    c.objective.offset_noise = 0.0    # e.g. 0.05-0.1: darker darks / brighter brights
    c.objective.timestep_min = 0      # train timesteps drawn uniformly from [min, max)
    c.objective.timestep_max = 0      # 0 = num_train_timesteps
    c.objective.timestep_bias = "none"         # none | later | earlier: draw the last / first portion of
    c.objective.timestep_bias_portion = 0.25   # [min, max) `multiplier` times as often (diffusers'
    c.objective.timestep_bias_multiplier = 1.0  # --timestep_bias_strategy); later = more high-noise steps
    c.objective.latent_sample = False  # latents from a posterior sample (True) or its mean (False)

    c.autoencoder = ml_collections.ConfigDict()   # stage="autoencoder"
    c.autoencoder.reconstruction = "l1"  # l1 | l2
    c.autoencoder.kl_weight = 1e-6
    c.autoencoder.set_scaling_factor = True  # export scaling_factor = 1 / std(latents), measured on a batch

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"      # any optax optimizer taking learning_rate
    c.optimizer.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))
    c.optimizer.learning_rate = 1e-5
    c.optimizer.text_encoder_learning_rate = 0.0  # 0 = learning_rate
    c.optimizer.schedule = "constant"  # constant | cosine (after linear warm-up)
    c.optimizer.warmup_steps = 500
    c.optimizer.end_lr_fraction = 0.0  # cosine: final lr = learning_rate * this
    c.optimizer.grad_clip_norm = 1.0   # 0 = off
    c.optimizer.grad_accum_steps = 1   # > 1: optax.MultiSteps (each optimizer step sees this many batches)

    c.lora = ml_collections.ConfigDict()  # low-rank adapters (sdjax.lora_training) on a pretrained model
    c.lora.rank = 0                # 0: train the weights themselves; > 0: only adapters of this rank train
    c.lora.alpha = 0.0             # adapters add alpha / rank * up(down(x)); 0 = the rank (a factor of 1)
    c.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")  # UNet layers (path suffixes: "attn2.to_q" = cross-
                                   # attention only); + "ff.net.0.proj", "ff.net.2" for the feed-forwards too
    c.lora.text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj")  # with train_text_encoder=True
    c.lora.dropout = 0.0           # PEFT's lora_dropout: each adapter's input dropped while training
    c.lora.name = ""               # workdir/lora/<name>.safetensors (kohya, A1111's <lora:name:1>); "" = the
                                   # workdir's folder name. Also pytorch_lora_weights.safetensors (diffusers)

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.9999           # 0 = no EMA (previews and export use the raw parameters)
    c.ema.warmup = True            # decay min(decay, (1 + n) / (10 + n)) after n updates

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1               # devices along the data axis (-1: the rest)
    c.mesh.fsdp = 1                # parameter / optimizer-state sharding axis
    c.mesh.fsdp_min_size = 2 ** 14  # smaller arrays stay replicated
    c.mesh.cpu_devices = 0         # > 0: split the CPU into this many JAX devices (one per core: ~20% faster
                                   # on 2 cores); XLA_FLAGS=--xla_force_host_platform_device_count wins

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000      # and at the end, and on SIGTERM; 0 = never (benchmarks)
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log_every = 10               # metrics.jsonl, TensorBoard, progress bar
    c.progress_bar = True
    c.preview_every = 0            # > 0: sample preview_prompts with the EMA weights every N steps
    c.preview = ml_collections.ConfigDict()
    c.preview.prompts = ("a photo of a cat", "a watercolor painting of a lighthouse")
    c.preview.seed = 0
    c.preview.num_inference_steps = 20
    c.preview.guidance_scale = 5.0

    c.export = ml_collections.ConfigDict()
    c.export.formats = ("diffusers",)  # any of diffusers, single_file (A1111), vae; () = none
    c.export.dtype = ""            # "" = the parameters' dtype; float16 | bfloat16 | float32
    c.export.path = ""             # "" = workdir/export

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set);
                                   # with no address it detects SLURM / Open MPI / TPU pods / Kubernetes
    c.distributed.coordinator_address = ""  # "host:port" (or JAX_COORDINATOR_ADDRESS); with num_processes and
    c.distributed.num_processes = 0         # process_id (or JAX_NUM_PROCESSES, JAX_PROCESS_ID) when not automatic
    c.distributed.process_id = -1
    c.distributed.cpu_collectives = ""  # "gloo" for multi-process CPU runs
    c.compilation_cache_dir = ""   # persistent XLA compilation cache (restarts skip compiling)
    return c
