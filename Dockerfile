# One image for every role; compose.yaml picks the role with the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY warmserve warmserve
COPY protocol protocol
COPY modelinfo modelinfo
COPY gateway gateway
COPY invoker invoker
COPY worker worker
COPY warmer warmer
COPY gpu_runtime gpu_runtime
COPY functions functions
COPY sim sim
RUN pip install --no-cache-dir -e '.[reference]'
ENTRYPOINT ["warmserve"]
