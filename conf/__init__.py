# The YAML config groups, shipped as the package `diffusion_cli.conf` so Hydra finds them in an
# installed wheel as well as in a checkout (config_path="pkg://diffusion_cli.conf").
