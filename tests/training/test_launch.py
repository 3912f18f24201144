"""Reading how a process was launched (accelerate launch / torchrun / mpirun) from its environment, and the
launches Kiln refuses in one line."""
from library.training.launch import Launch, launch_info, launch_problems


def test_one_process_when_no_launcher_set_the_environment():
    assert launch_info({}) == Launch(1, 0, 0)
    assert launch_info({"WORLD_SIZE": "1", "RANK": "0"}).is_main


def test_torchrun_and_mpirun_variables():
    torchrun = launch_info({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert torchrun == Launch(4, 3, 1) and not torchrun.is_main
    assert launch_info({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == Launch(2, 1, 1)
    assert launch_info({"PMI_SIZE": "2", "PMI_RANK": "0"}) == Launch(2, 0, 0)


def test_the_global_batch_must_split_evenly():
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    assert launch_problems(4, "auto", env) == []
    (problem,) = launch_problems(3, "auto", env)
    assert "train.batch_size = 3" in problem and "global batch" in problem and "multiple of 2" in problem


def test_a_numbered_gpu_is_refused_when_each_process_takes_its_own():
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    (problem,) = launch_problems(2, "cuda:1", env)
    assert "train.device = 'cuda:1'" in problem and "--gpu_ids" in problem
    assert launch_problems(2, "cuda:1", {}) == []  # one process: the GPU it names
    assert launch_problems(2, "mps", env)


def test_accelerate_launch_cpu_that_started_one_process_says_how_to_start_several():
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    (problem,) = launch_problems(2, "auto", env)
    assert "started one process" in problem and "--multi_gpu --num_processes N" in problem
    assert launch_problems(2, "auto", {"ACCELERATE_USE_CPU": "True"}) == []  # --cpu alone: one process asked for


def test_sharding_configs_are_refused_not_silently_run_unsharded():
    (problem,) = launch_problems(2, "auto", {"WORLD_SIZE": "2", "RANK": "0", "ACCELERATE_USE_FSDP": "true"})
    assert "selects FSDP" in problem and "multi-GPU" in problem
    assert "selects DeepSpeed" in launch_problems(2, "auto", {"ACCELERATE_USE_DEEPSPEED": "true"})[0]


def test_the_fused_backward_pass_is_refused_with_several_processes():
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    (problem,) = launch_problems(2, "auto", env, fused_backward_pass=True)
    assert "optimizer.fused_backward_pass" in problem and "2 processes" in problem
    assert launch_problems(2, "auto", {}, fused_backward_pass=True) == []  # one process: steps as it goes


def test_noise_that_couples_the_rows_of_a_batch_is_refused_with_several_processes():
    (problem,) = launch_problems(2, "auto", {"WORLD_SIZE": "2", "RANK": "1"}, batch_coupled_noise=True)
    assert "train.adaptive_noise_scale" in problem and "train.multires_noise_iterations" in problem
    assert launch_problems(2, "auto", {}, batch_coupled_noise=True) == []
