"""The AWS resources the clusters use, as a CloudFormation template (validated offline with cfn-lint).

The bucket for shards, checkpoints and MLflow artifacts (private, encrypted, versioned, TLS only, with a
lifecycle rule that expires old checkpoint versions), one managed policy for access to it, the instance
profiles of the Ray launcher's nodes, an EFA security group and a cluster placement group. Kubernetes pods
get the same policy through IRSA (the runbook attaches the stack's policy output with eksctl).
"""

from __future__ import annotations

from pipeline.cluster.spec import ClusterSpec

CHECKPOINT_PREFIX = "checkpoints/"


def _sub(s: str) -> dict:
    return {"Fn::Sub": s}


def render_stack(spec: ClusterSpec) -> dict:
    bucket_arn = _sub("arn:${AWS::Partition}:s3:::${Bucket}")
    objects_arn = _sub("arn:${AWS::Partition}:s3:::${Bucket}/*")
    ec2_trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                       "Action": "sts:AssumeRole"}],
    }
    # Bucket access, and pulling the project image from ECR on the launcher's nodes.
    managed = [{"Ref": "BucketAccessPolicy"},
               _sub("arn:${AWS::Partition}:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly")]
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"CoAtNet pipeline shared AWS resources for cluster {spec.name} (bucket, IAM, EFA network)",
        "Parameters": {
            "BucketName": {"Type": "String", "Default": spec.bucket,
                           "AllowedPattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"},
            "ClusterName": {"Type": "String", "Default": spec.name},
            "VpcId": {"Type": "AWS::EC2::VPC::Id", "Description": "VPC of the cluster's subnet"},
            "SshCidr": {"Type": "String", "Default": "10.0.0.0/8",
                        "Description": "Where `ray up` connects from (SSH to the head node)",
                        "AllowedPattern": r"^(\d{1,3}\.){3}\d{1,3}/\d{1,2}$"},
            "CheckpointNoncurrentDays": {
                "Type": "Number", "Default": spec.checkpoint_retention_days, "MinValue": 1,
                "Description": "Days an overwritten or deleted checkpoint object is kept before it expires",
            },
        },
        "Resources": {
            "Bucket": {
                "Type": "AWS::S3::Bucket",
                "DeletionPolicy": "Retain",
                "UpdateReplacePolicy": "Retain",
                "Properties": {
                    "BucketName": {"Ref": "BucketName"},
                    "VersioningConfiguration": {"Status": "Enabled"},
                    "BucketEncryption": {"ServerSideEncryptionConfiguration": [
                        {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}, "BucketKeyEnabled": True}
                    ]},
                    "PublicAccessBlockConfiguration": {
                        "BlockPublicAcls": True, "BlockPublicPolicy": True,
                        "IgnorePublicAcls": True, "RestrictPublicBuckets": True,
                    },
                    "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
                    "LifecycleConfiguration": {"Rules": [
                        {
                            # The trainer keeps the last K checkpoints and deletes older ones; versioning turns
                            # those deletes into noncurrent versions, which this rule expires.
                            "Id": "expire-old-checkpoint-versions",
                            "Status": "Enabled",
                            "Prefix": CHECKPOINT_PREFIX,
                            "NoncurrentVersionExpiration": {"NoncurrentDays": {"Ref": "CheckpointNoncurrentDays"}},
                            "ExpiredObjectDeleteMarker": True,
                        },
                        {
                            "Id": "checkpoints-to-intelligent-tiering",
                            "Status": "Enabled",
                            "Prefix": CHECKPOINT_PREFIX,
                            "Transitions": [{"StorageClass": "INTELLIGENT_TIERING", "TransitionInDays": 30}],
                        },
                        {
                            "Id": "abort-incomplete-multipart-uploads",
                            "Status": "Enabled",
                            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
                        },
                    ]},
                },
            },
            "BucketPolicy": {
                "Type": "AWS::S3::BucketPolicy",
                "Properties": {
                    "Bucket": {"Ref": "Bucket"},
                    "PolicyDocument": {"Version": "2012-10-17", "Statement": [{
                        "Sid": "DenyInsecureTransport",
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:*",
                        "Resource": [bucket_arn, objects_arn],
                        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                    }]},
                },
            },
            "BucketAccessPolicy": {
                "Type": "AWS::IAM::ManagedPolicy",
                "Properties": {
                    "Description": "Read and write the pipeline bucket (shards, checkpoints, MLflow artifacts)",
                    "PolicyDocument": {"Version": "2012-10-17", "Statement": [
                        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                         "Resource": bucket_arn},
                        {"Effect": "Allow",
                         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                         "Resource": objects_arn},
                    ]},
                },
            },
            "WorkerRole": {
                "Type": "AWS::IAM::Role",
                "Properties": {"AssumeRolePolicyDocument": ec2_trust, "ManagedPolicyArns": managed},
            },
            "WorkerInstanceProfile": {
                "Type": "AWS::IAM::InstanceProfile",
                "Properties": {"Roles": [{"Ref": "WorkerRole"}]},
            },
            "HeadRole": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "AssumeRolePolicyDocument": ec2_trust,
                    "ManagedPolicyArns": managed,
                    "Policies": [{
                        "PolicyName": "ray-autoscaler",
                        "PolicyDocument": {"Version": "2012-10-17", "Statement": [
                            {
                                # What the Ray autoscaler on the head calls to launch and remove workers.
                                "Effect": "Allow",
                                "Action": ["ec2:RunInstances", "ec2:TerminateInstances", "ec2:StartInstances",
                                           "ec2:StopInstances", "ec2:CreateTags", "ec2:DeleteTags",
                                           "ec2:DescribeInstances", "ec2:DescribeInstanceTypes",
                                           "ec2:DescribeImages", "ec2:DescribeSubnets",
                                           "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs",
                                           "ec2:DescribeLaunchTemplateVersions",
                                           "ec2:DescribePlacementGroups"],
                                "Resource": "*",
                            },
                            {"Effect": "Allow", "Action": "iam:PassRole", "Resource": {"Fn::GetAtt": ["WorkerRole", "Arn"]}},
                            {
                                # An external MLflow database URI, if one is used, is read from here.
                                "Effect": "Allow",
                                "Action": "secretsmanager:GetSecretValue",
                                "Resource": _sub(
                                    "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:"
                                    "secret:${ClusterName}/mlflow-db-*"
                                ),
                            },
                        ]},
                    }],
                },
            },
            "HeadInstanceProfile": {
                "Type": "AWS::IAM::InstanceProfile",
                "Properties": {"Roles": [{"Ref": "HeadRole"}]},
            },
            "ClusterSecurityGroup": {
                "Type": "AWS::EC2::SecurityGroup",
                "Properties": {
                    "GroupDescription": "Ray nodes: all traffic within the group (EFA needs it), SSH from SshCidr",
                    "VpcId": {"Ref": "VpcId"},
                    "SecurityGroupIngress": [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                              "CidrIp": {"Ref": "SshCidr"}}],
                },
            },
            "ClusterIngressSelf": {
                "Type": "AWS::EC2::SecurityGroupIngress",
                "Properties": {"GroupId": {"Ref": "ClusterSecurityGroup"}, "IpProtocol": "-1",
                               "SourceSecurityGroupId": {"Ref": "ClusterSecurityGroup"}},
            },
            "ClusterEgressSelf": {
                "Type": "AWS::EC2::SecurityGroupEgress",
                "Properties": {"GroupId": {"Ref": "ClusterSecurityGroup"}, "IpProtocol": "-1",
                               "DestinationSecurityGroupId": {"Ref": "ClusterSecurityGroup"}},
            },
            "PlacementGroup": {
                "Type": "AWS::EC2::PlacementGroup",
                "Properties": {"Strategy": "cluster"},
            },
        },
        "Outputs": {
            "BucketName": {"Value": {"Ref": "Bucket"}},
            "BucketAccessPolicyArn": {"Value": {"Ref": "BucketAccessPolicy"}},
            "WorkerInstanceProfileArn": {"Value": {"Fn::GetAtt": ["WorkerInstanceProfile", "Arn"]}},
            "HeadInstanceProfileArn": {"Value": {"Fn::GetAtt": ["HeadInstanceProfile", "Arn"]}},
            "SecurityGroupId": {"Value": {"Ref": "ClusterSecurityGroup"}},
            "PlacementGroupName": {"Value": {"Ref": "PlacementGroup"}},
        },
    }
