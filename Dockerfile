# One image for the Dataflow Flex Template launcher and the Beam worker SDK container.
# Build:  docker build -t REGION-docker.pkg.dev/PROJECT/REPO/ckptbeam:0.1.0 .
# (No Docker engine runs on the development/CI machines; the file is linted by tests/test_dataflow_template.py.)
FROM python:3.11-slim

# Beam's worker boot binary and SDK harness: the apache-beam version in constraints.txt.
COPY --from=apache/beam_python3.11_sdk:2.77.0 /opt/apache/beam /opt/apache/beam
# The Flex Template launcher binary.
COPY --from=gcr.io/dataflow-templates-base/python311-template-launcher-base:latest /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher

WORKDIR /template
COPY pyproject.toml constraints.txt README.md ./
COPY ckpt_transforms/ ckpt_transforms/
COPY model_maps/ model_maps/
COPY pipelines/ pipelines/
COPY dataflow_templates/ dataflow_templates/
# The tested versions (constraints.txt), so the SDK harness matches the Beam image above.
RUN pip install --no-cache-dir -c constraints.txt .

# The launcher runs this file; workers use this same image via --sdk_container_image.
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/dataflow_templates/launch.py
ENTRYPOINT ["/opt/apache/beam/boot"]
