"""The engine under the stages: SET prompt building (``prompts``), the rollout sampler (``sampler``) and
teacher-forced log-probs with the prompt-batch operations around them (``scoring``)."""
